"""Chunk kernels: DARE, TIES and Consensus-TIES on one chunk, given the global statistics.

They call the same kernels as the in-memory methods (`subboost.merging.dare.drop`,
`subboost.merging.trim_with_threshold`, `summed_signs`, `break_ties`,
`disjoint_merge`, `subboost.merging.consensus_mask`), with TIES's thresholds
and tie-breaking sign passed in instead of computed from the whole task vector, so the
result is bit-identical. Each is jitted over lists of leaves: same-shaped chunks (the
blocks of a transformer) share one compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from subboost.merging.averaging import expert_sum
from subboost.merging.consensus import apply_mask, consensus_mask
from subboost.merging.dare import drop
from subboost.merging.registry import StreamingScheme
from subboost.merging.ties import (
    break_ties,
    disjoint_merge,
    per_leaf_threshold,
    sign_votes,
    summed_signs,
    trim_with_threshold,
)


def _drop(tvs: list[jax.Array], masks: list[jax.Array] | None, p: float | None) -> list[jax.Array]:
    """DARE's drop and rescale, given the leaves' keep masks (``p=None``: no drop)."""
    if p is None:
        return tvs
    return [drop(x, keep, p=p) for x, keep in zip(tvs, masks)]


def _trim(tvs: list[jax.Array], thresholds: jax.Array | None, settings: tuple[float, str, str]) -> list[jax.Array]:
    """TIES's trim given the global per-task thresholds (``None``: ``k`` keeps everything), or per leaf."""
    k, _, scope = settings
    if scope == "per_leaf":
        return [trim_with_threshold(x, per_leaf_threshold(x, k)) for x in tvs]
    if thresholds is None:
        return tvs
    return [trim_with_threshold(x, thresholds) for x in tvs]


@functools.partial(jax.jit, static_argnames=("p", "float_dtype"))
def magnitude_bits(tvs, masks, *, p, float_dtype):
    """Bit patterns of ``|x|`` (as `kth_smallest_magnitude` forms them), after DARE's drop."""
    int_dtype = jnp.int64 if jnp.dtype(float_dtype) == jnp.float64 else jnp.int32
    return [jax.lax.bitcast_convert_type(jnp.abs(x.astype(float_dtype)), int_dtype) for x in _drop(tvs, masks, p)]


@functools.partial(jax.jit, static_argnames=("scheme",))
def sign_balance(tvs, masks, thresholds, *, scheme: StreamingScheme) -> jax.Array:
    """``#(+) - #(-)`` of the elected signs before ties are broken (an exact integer)."""
    trimmed = _trim(_drop(tvs, masks, scheme.drop_p), thresholds, scheme.ties)
    return sign_votes(summed_signs(trimmed), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)


@functools.partial(jax.jit, static_argnames=("scheme",))
def merge_elementwise(tvs, masks, thresholds, majority, *, scheme: StreamingScheme) -> list[jax.Array]:
    """DARE / TIES / Consensus-TIES on one chunk, given the global statistics."""
    dropped = _drop(tvs, masks, scheme.drop_p)
    if scheme.ties is None:  # DARE + Task Arithmetic
        return [expert_sum(x) for x in dropped]
    trimmed = _trim(dropped, thresholds, scheme.ties)
    merged = disjoint_merge(trimmed, break_ties(summed_signs(trimmed), majority), merge=scheme.ties[1])
    if scheme.consensus is not None:
        lambdas, min_tasks = scheme.consensus
        merged = apply_mask(consensus_mask(tvs, lambdas=lambdas, min_tasks=min_tasks), merged)
    return merged


__all__ = ["magnitude_bits", "merge_elementwise", "sign_balance"]
