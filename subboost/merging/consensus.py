"""Consensus merging with TALL masks (Wang et al., 2024, arXiv 2405.07813).

``tau_MTL = sum_t tau_t``. Task masks
``m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|`` mark the entries task t relies
on; the consensus mask keeps entries relied on by at least ``min_tasks``
tasks (``sum_t m_t >= min_tasks``; the paper's ``k``), removing both selfish (one task) and catastrophic (no
task) weights. Consensus-TA: ``mask * tau_MTL``; Consensus-TIES:
``mask * tau_TIES``.

``mask_from="merged"`` builds the task masks against the base merge instead
of the sum, ``m_t = |tau_t| > lambda_t |tau_base - tau_t|``: TALL's
Consensus-TIES (masks from the TIES vector, with TIES' disjoint ``sum``;
`subboost.reference.reference_settings`). For Consensus-TA both are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from subboost.linalg import compute_dtype
from subboost.merging.averaging import ordered_sum, task_arithmetic
from subboost.merging.dare import BASES
from subboost.merging.ties import ties
from subboost.tree import PyTree
from subboost.validation import check_choice

MASK_FROM: tuple[str, ...] = ("sum", "merged")


def _lambda_column(lambdas: float | Sequence[float], num_tasks: int, ndim: int, dtype) -> jax.Array:
    values = jnp.broadcast_to(jnp.asarray(lambdas, dtype), (num_tasks,))
    return values.reshape((num_tasks,) + (1,) * (ndim - 1))


def tall_masks(tvs: PyTree, *, lambdas: float | Sequence[float] = 0.4, merged: PyTree | None = None) -> PyTree:
    """Per-task TALL masks ``|tau_t| > lambda_t |tau_MTL - tau_t|`` (bool, leading axis T).

    ``merged`` replaces ``tau_MTL = sum_t tau_t`` (e.g. the TIES vector).
    """

    def leaf(x, total=None):
        xc = x.astype(compute_dtype(x.dtype))
        total = ordered_sum(xc)[None] if total is None else total.astype(xc.dtype)[None]
        lam = _lambda_column(lambdas, x.shape[0], x.ndim, xc.dtype)
        return jnp.abs(xc) > lam * jnp.abs(total - xc)

    if merged is None:
        return jax.tree_util.tree_map(leaf, tvs)
    return jax.tree_util.tree_map(leaf, tvs, merged)


def consensus_mask(tvs: PyTree, *, lambdas: float | Sequence[float] = 0.4, min_tasks: int = 2,
                   merged: PyTree | None = None) -> PyTree:
    """``(sum_t m_t) >= min_tasks``: entries at least ``min_tasks`` tasks rely on."""
    masks = tall_masks(tvs, lambdas=lambdas, merged=merged)
    return jax.tree_util.tree_map(lambda m: jnp.sum(m, axis=0) >= min_tasks, masks)


def apply_mask(mask: PyTree, merged: PyTree) -> PyTree:
    """``mask * merged``: zeroes the entries the consensus mask drops."""
    return jax.tree_util.tree_map(lambda m, t: jnp.where(m, t, jnp.zeros_like(t)), mask, merged)


def consensus(
    tvs: PyTree,
    *,
    base: str = "task_arithmetic",
    lambdas: float | Sequence[float] = 0.4,
    min_tasks: int = 2,
    mask_from: str = "sum",
    **base_kwargs: Any,
) -> PyTree:
    """Consensus-TA (``base="task_arithmetic"``) or Consensus-TIES (``base="ties"``).

    Args:
      tvs: stacked task vectors (leading expert axis T).
      base: the merge the consensus mask is applied to.
      lambdas: per-task TALL-mask thresholds, one float or a length-T sequence
        (tuned on validation over {0.2, 0.3, 0.4, 0.5, 0.6} in the paper).
      min_tasks: minimum number of tasks relying on an entry for it to be kept
        (the paper's ``k``).
      mask_from: ``"sum"`` (masks against ``tau_MTL = sum_t tau_t``, the paper's
        definition) or ``"merged"`` (against the base merge, TALL's
        Consensus-TIES code).
      **base_kwargs: hyper-parameters of ``base`` (TIES: ``k``, ``merge``, ``scope``).
    """
    check_choice("base", base, BASES, what="consensus")
    check_choice("mask_from", mask_from, MASK_FROM, what="consensus")
    merged = ties(tvs, **base_kwargs) if base == "ties" else task_arithmetic(tvs, **base_kwargs)
    mask = consensus_mask(tvs, lambdas=lambdas, min_tasks=min_tasks, merged=merged if mask_from == "merged" else None)
    return apply_mask(mask, merged)
