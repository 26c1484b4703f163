"""Batched accuracy of sentence encoders with the frozen prototype heads.

All splits are stacked ``(T, n, L)``. `accuracies` evaluates one encoder on every task,
`accuracies_at` evaluates ``theta_0 + alpha * tau`` (``tau`` covers the transformer blocks;
alpha is traced, so an alpha sweep reuses one compiled program), `expert_accuracies`
evaluates expert ``t`` on task ``t``. Sentences go through the encoder ``batch`` at a time
(`jax.lax.map`), so memory stays bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subboost.bench.accuracy import map_in_batches, params_at, sweep_alphas
from subboost.models.bert import BertConfig
from subboost.bench.suites.text.prototype_heads import task_logits
from subboost.bench.suites.text.model import make_embedder, with_encoder

_STATIC = ("model", "batch")


def features(params: dict, ids: jax.Array, mask: jax.Array, *, model: BertConfig, batch: int) -> jax.Array:
    """``(N, L)`` -> ``(N, width)`` mean-pooled embeddings, ``batch`` sentences per forward pass."""
    embed = make_embedder(model)
    return map_in_batches(lambda i, m: embed(params, i, m), ids, mask, batch=batch)


def _accuracies(params, ids, mask, labels, heads, *, model, batch):
    num_tasks, n, length = ids.shape
    feats = features(params, ids.reshape(-1, length), mask.reshape(-1, length), model=model, batch=batch)
    logits = task_logits(feats.reshape(num_tasks, n, -1), heads)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels, axis=1)


accuracies = jax.jit(_accuracies, static_argnames=_STATIC)
accuracies.__doc__ = "Accuracy of one encoder on each task: ``(T,)``."


@functools.partial(jax.jit, static_argnames=_STATIC)
def accuracies_at(base, tau, alpha, ids, mask, labels, heads, *, model, batch):
    """Accuracy of ``theta_0 + alpha * tau`` (``tau``: the ``encoder`` subtree) on each task: ``(T,)``."""
    encoder = params_at(base["encoder"], tau, alpha)
    return _accuracies(with_encoder(base, encoder), ids, mask, labels, heads, model=model, batch=batch)


def expert_accuracies(base, experts, ids, mask, labels, heads, *, model, batch) -> np.ndarray:
    """Expert ``t`` (index ``t`` of the stacked ``experts`` encoders) on task ``t`` only: ``(T,)``."""
    out = []
    for t in range(labels.shape[0]):
        encoder = jax.tree_util.tree_map(lambda x, t=t: x[t], experts)
        head = jax.tree_util.tree_map(lambda x, t=t: x[t:t + 1], heads)
        out.append(accuracies(with_encoder(base, encoder), ids[t:t + 1], mask[t:t + 1], labels[t:t + 1], head,
                              model=model, batch=batch)[0])
    return np.asarray(jnp.stack(out))


def alpha_sweep(base, tau, alphas: Sequence[float], ids, mask, labels, heads, *, model, batch) -> np.ndarray:
    """``(A, T)`` accuracies of ``theta_0 + alpha * tau`` for every alpha (one host sync)."""
    return sweep_alphas(accuracies_at, base, tau, alphas, ids, mask, labels, heads, model=model, batch=batch)
