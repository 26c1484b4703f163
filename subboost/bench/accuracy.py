"""Accuracy helpers every suite shares: batched forward passes, ``theta_0 + alpha tau``, alpha sweeps.

A suite's evaluation (`subboost.bench.suites.vision.evaluate`, `subboost.bench.suites.text.evaluate`)
supplies the model's forward pass and the heads; these functions do the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def map_in_batches(fn: Callable[..., jax.Array], *arrays: jax.Array, batch: int) -> jax.Array:
    """``fn`` over the leading axis of ``arrays``, ``batch`` rows per call (`jax.lax.map`; the last batch padded).

    Memory stays bounded by one batch; the padding rows are dropped from the result. Shared by every
    suite's evaluation.
    """
    n = arrays[0].shape[0]
    batch = min(batch, n)
    num_batches = math.ceil(n / batch)
    padded = [jnp.pad(a, ((0, num_batches * batch - n),) + ((0, 0),) * (a.ndim - 1)) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(a.reshape((num_batches, batch) + a.shape[1:]) for a in padded))
    return out.reshape((num_batches * batch,) + out.shape[2:])[:n]


def params_at(base, tau, alpha):
    """``theta_0 + alpha * tau`` (alpha cast to each leaf's dtype)."""
    return jax.tree_util.tree_map(lambda p, t: p + alpha.astype(p.dtype) * t.astype(p.dtype), base, tau)


def sweep_alphas(accuracies_at: Callable[..., jax.Array], base, tau, alphas: Sequence[float], *data,
                 **static) -> np.ndarray:
    """``(A, T)``: ``accuracies_at(base, tau, alpha, *data, **static)`` for every alpha (one host sync)."""
    rows = [accuracies_at(base, tau, jnp.float32(a), *data, **static) for a in alphas]
    return np.asarray(jnp.stack(rows))
