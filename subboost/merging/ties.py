"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., 2023, arXiv 2306.01708).

1. Trim: per task keep the entries whose magnitude is at least the task's
   threshold ``v_t``, the ``kk``-th smallest magnitude of its whole flattened
   task vector with ``kk = N - int(N * k)`` (N entries; the reference code's
   ``kthvalue`` rule, so entries equal to the threshold are kept).
2. Elect: ``gamma = sign(sum_t trimmed_t)``; entries where that sum is zero take
   the sign of the total ``sum(gamma)`` over all parameters.
3. Disjoint merge over the tasks whose trimmed entry has the elected sign:
   ``mean`` (divided by their count, clamped to >= 1) or ``sum``.

The threshold is found exactly and without sorting: non-negative floats order
like their bit patterns as integers, so a 32-step (64 for float64) bisection on
bit patterns, counting ``|x| <= t`` over all leaves, finds the ``kk``-th
smallest value. It never concatenates the parameters, and the same counts can
be accumulated chunk by chunk when experts are streamed from disk.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from subboost.linalg import compute_dtype
from subboost.merging.averaging import ordered_sum
from subboost.tree import PyTree
from subboost.validation import check_choice

TrimScope = Literal["global", "per_leaf"]
TRIM_SCOPES: tuple[str, ...] = ("global", "per_leaf")
MERGE_MODES: tuple[str, ...] = ("mean", "sum")


def _bits_dtypes(dtype):
    if jnp.dtype(dtype) == jnp.float64:
        return jnp.float64, jnp.int64, 64
    return jnp.float32, jnp.int32, 32


def kth_smallest_magnitude(leaves: list[jax.Array], kk: int) -> jax.Array:
    """Per task (leading axis), the ``kk``-th smallest ``|x|`` over all ``leaves``.

    Args:
      leaves: arrays with a common leading axis T.
      kk: 1-based rank, ``1 <= kk <= N`` (N entries per task over all leaves).

    Returns:
      ``(T,)`` thresholds in the float dtype used for the bit patterns.
    """
    float_dtype, int_dtype, nbits = _bits_dtypes(jnp.result_type(*leaves))
    bits = [jax.lax.bitcast_convert_type(jnp.abs(x.astype(float_dtype)), int_dtype) for x in leaves]
    num_tasks = leaves[0].shape[0]

    def count_le(t):  # t: (T,) -> number of entries with |x| <= t, per task
        total = jnp.zeros((num_tasks,), jnp.int32 if nbits == 32 else jnp.int64)
        for b in bits:
            below = b.reshape(num_tasks, -1) <= t[:, None]
            total = total + jnp.sum(below, axis=1, dtype=total.dtype)
        return total

    lo = jnp.zeros((num_tasks,), int_dtype)
    hi = jnp.full((num_tasks,), jnp.iinfo(int_dtype).max, int_dtype)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = count_le(mid) >= kk
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, nbits, step, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, float_dtype)


def trim_rank(num_entries: int, k: float) -> int:
    """``kk = N - int(N * k)``: rank of the threshold among ascending magnitudes."""
    return num_entries - int(num_entries * k)


def per_leaf_threshold(x: jax.Array, k: float) -> jax.Array:
    """Per task, the threshold that keeps the top-``k`` fraction of one leaf (``scope="per_leaf"``)."""
    kk = trim_rank(x[0].size, k)
    return kth_smallest_magnitude([x], kk) if kk >= 1 else jnp.zeros(x.shape[:1])


def trim_with_threshold(x: jax.Array, threshold: jax.Array) -> jax.Array:
    """Zeroes the entries of task ``t`` with ``|x| < threshold[t]`` (``x``: ``(T, ...)``, ``threshold``: ``(T,)``)."""
    threshold = threshold.reshape((-1,) + (1,) * (x.ndim - 1))
    keep = jnp.abs(x.astype(threshold.dtype)) >= threshold
    return jnp.where(keep, x, jnp.zeros_like(x))


def trim(tvs: PyTree, *, k: float = 0.2, scope: TrimScope = "global") -> PyTree:
    """Keeps each task's top-``k`` fraction of entries by magnitude, zeroes the rest."""
    check_choice("scope", scope, TRIM_SCOPES, what="ties")
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    if scope == "per_leaf":
        return jax.tree_util.tree_unflatten(treedef, [trim_with_threshold(x, per_leaf_threshold(x, k)) for x in leaves])
    kk = trim_rank(sum(x[0].size for x in leaves), k)
    if kk < 1:
        return tvs
    threshold = kth_smallest_magnitude(leaves, kk)
    return jax.tree_util.tree_unflatten(treedef, [trim_with_threshold(x, threshold) for x in leaves])


def summed_signs(trimmed: PyTree) -> PyTree:
    """``sign(sum_t trimmed_t)`` per entry, before ties (zeros) are broken."""
    return jax.tree_util.tree_map(lambda x: jnp.sign(ordered_sum(x.astype(compute_dtype(x.dtype)))), trimmed)


def sign_votes(signs: PyTree, dtype=jnp.int32) -> jax.Array:
    """``sum(signs)`` over all parameters, counted in integers (a float sum of millions of +-1 could round)."""
    return sum(jnp.sum(s.astype(dtype)) for s in jax.tree_util.tree_leaves(signs))


def break_ties(signs: PyTree, majority: jax.Array) -> PyTree:
    """Entries whose summed sign is zero take ``majority`` (the sign of `sign_votes`)."""
    return jax.tree_util.tree_map(lambda s: jnp.where(s == 0, majority, s), signs)


def elect_signs(trimmed: PyTree) -> PyTree:
    """``sign(sum_t trimmed_t)``; zeros take the sign of the total over all parameters."""
    signs = summed_signs(trimmed)
    majority = jnp.sign(sign_votes(signs)).astype(jax.tree_util.tree_leaves(signs)[0].dtype)
    return break_ties(signs, majority)


def disjoint_merge(trimmed: PyTree, signs: PyTree, *, merge: str = "mean") -> PyTree:
    """Aggregates, per entry, the tasks whose trimmed value agrees with the elected sign."""
    check_choice("merge", merge, MERGE_MODES, what="ties")

    def leaf(x, s):
        xc = x.astype(compute_dtype(x.dtype))
        agrees = jnp.where(s > 0, xc > 0, xc < 0)
        selected = jnp.where(agrees, xc, 0)
        total = ordered_sum(selected)
        if merge == "sum":
            return total.astype(x.dtype)
        count = jnp.sum(selected != 0, axis=0)
        return (total / jnp.maximum(count, 1)).astype(x.dtype)

    return jax.tree_util.tree_map(leaf, trimmed, signs)


def ties(tvs: PyTree, *, k: float = 0.2, merge: str = "mean", scope: TrimScope = "global") -> PyTree:
    """TIES-Merging of stacked task vectors (leading expert axis).

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      k: fraction of each task's entries kept by the trim step, in (0, 1].
      merge: ``"mean"`` (default) or ``"sum"`` disjoint aggregation.
      scope: ``"global"`` (default; one threshold over the task's whole task
        vector, as REFERENCE.md requires) or ``"per_leaf"``.

    Returns:
      The merged task vector (structure of one expert).
    """
    trimmed = trim(tvs, k=k, scope=scope)
    return disjoint_merge(trimmed, elect_signs(trimmed), merge=merge)
