"""DARE: drop and rescale, then a base merge (Yu et al., 2024, arXiv 2311.03099).

Each entry of each task vector is dropped with probability ``p`` and the
survivors are rescaled by ``1 / (1 - p)`` so the expectation is unchanged:
``tau_t' = m_t * tau_t / (1 - p)``, ``m_t ~ Bernoulli(1 - p)``; then Task
Arithmetic or TIES merges the sparsified vectors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from subboost.merging.averaging import task_arithmetic
from subboost.merging.ties import ties
from subboost.tree import PyTree


def drop_and_rescale(tvs: PyTree, *, key: jax.Array, p: float) -> PyTree:
    """Drops each entry with probability ``p`` and rescales survivors by ``1/(1-p)``."""
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    keys = jax.random.split(key, len(leaves))
    out = []
    for x, k in zip(leaves, keys):
        keep = jax.random.bernoulli(k, 1.0 - p, x.shape)
        out.append(jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros_like(x)).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def dare(
    tvs: PyTree,
    *,
    key: jax.Array,
    p: float = 0.9,
    base: str = "task_arithmetic",
    **base_kwargs: Any,
) -> PyTree:
    """DARE sparsification followed by ``base`` (``task_arithmetic`` or ``ties``).

    Args:
      tvs: stacked task vectors.
      key: a `jax.random` key; DARE is random and never picks one for you.
      p: drop probability in [0, 1).
      base: the merge applied to the sparsified task vectors.
      **base_kwargs: hyper-parameters of ``base`` (e.g. ``k`` for TIES).
    """
    dropped = drop_and_rescale(tvs, key=key, p=p)
    if base == "task_arithmetic":
        return task_arithmetic(dropped, **base_kwargs)
    if base == "ties":
        return ties(dropped, **base_kwargs)
    raise ValueError(f"dare: base must be 'task_arithmetic' or 'ties', got {base!r}.")
