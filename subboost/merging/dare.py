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
from subboost.validation import check_choice

# The merges DARE (and Consensus) can be applied to.
BASES: tuple[str, ...] = ("task_arithmetic", "ties")


def keep_mask(key: jax.Array, *, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``m ~ Bernoulli(1 - p)`` of one leaf's shape: True where the entry survives."""
    return jax.random.bernoulli(key, 1.0 - p, shape)


def drop(x: jax.Array, keep: jax.Array, *, p: float) -> jax.Array:
    """``keep * x / (1 - p)`` in ``x``'s dtype: DARE on one leaf, given its keep mask."""
    return jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros_like(x)).astype(x.dtype)


def drop_and_rescale(tvs: PyTree, *, key: jax.Array, p: float) -> PyTree:
    """Drops each entry with probability ``p`` and rescales survivors by ``1/(1-p)``.

    Leaf ``i`` (in tree-flatten order) draws its mask from ``split(key, num_leaves)[i]``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    keys = jax.random.split(key, len(leaves))
    out = [drop(x, keep_mask(k, p=p, shape=x.shape), p=p) for x, k in zip(leaves, keys)]
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
    check_choice("base", base, BASES, what="dare")
    dropped = drop_and_rescale(tvs, key=key, p=p)
    if base == "ties":
        return ties(dropped, **base_kwargs)
    return task_arithmetic(dropped, **base_kwargs)
