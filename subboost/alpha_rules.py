"""Merging coefficients chosen from the task vectors alone (no validation data).

A merge ``theta = theta_0 + alpha * tau_merged`` usually tunes ``alpha`` on held-out
data. The rules here compute it from the experts' task vectors ``tau_1..tau_T`` and
the merged task vector only (the paper's open question 1).

`alpha_from_norm` -- scale matching::

    alpha = mean_t ||tau_t||_F / ||tau_merged||_F

over every floating leaf (``reduce="mean"``; ``"max"`` uses the largest expert norm).
The merged model then moves as far from ``theta_0`` as an average expert does.
Identical experts merged by task arithmetic (``tau_merged = T tau_1``) give ``1/T``;
T mutually orthogonal experts of equal norm give ``1/sqrt(T)``.

`alpha_from_hogsvd` -- per-direction strength matching in the experts' shared basis.
Per matrix layer, the HO-GSVD of the T experts' matrices (`subboost.hogsvd`, robust
variant) writes ``tau_t = U_t diag(sigma_t) V^T`` with one right basis ``V``; the merged
matrix is placed in the same coordinates, ``g_k = ||(tau_merged V^{-T})[:, k]||``
(`subboost.alignment.generalized_singular_values`). Each direction ``k`` should be
carried as strongly as by the expert that uses it most::

    t_k   = max_t sigma_{t,k}                        (``target="max"``; ``"mean"``: mean_t)
    alpha = sqrt( sum_{l,k} t_{l,k}^2 / sum_{l,k} g_{l,k}^2 )

pooled over every direction ``k`` of every matrix layer ``l`` (in the robust
normalisation every direction's column ``sigma_{:,k}`` has unit norm over the experts,
so each shared direction counts once, whatever its magnitude). Identical experts
merged by task arithmetic give ``1/T`` (every direction is common: ``sigma_{t,k} =
1/sqrt(T)``, ``g_k = sqrt(T)``); experts in mutually orthogonal row spaces give ``1``
(every direction is isolated in one expert and the sum already carries it at full
strength). Only matrix layers enter; the chosen alpha scales every leaf.

Both functions are pure and jit-compatible (hyper-parameters are static). Called
eagerly they check their input and raise `SubboostError` on a merged task vector with
zero norm (or no component in the experts' basis), all-zero experts, or non-finite
values; under `jax.jit` those checks cannot raise, and degenerate input gives ``inf``
or ``nan`` -- call them eagerly to get the errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from subboost.alignment import generalized_singular_values
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite, check_floating, check_same_structure, num_experts
from subboost.tree import AttentionMode, PyTree
from subboost.validation import check_choice

__all__ = ["alpha_from_hogsvd", "alpha_from_norm"]

Reduce = Literal["mean", "max"]
_REDUCES: tuple[str, ...] = ("mean", "max")


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_inputs(tvs: PyTree, merged: PyTree) -> None:
    num = num_experts(tvs)
    check_same_structure(merged, tvs, what="task vectors", reference_name="merged", lead_shape=(num,),
                         check_dtype=False)
    check_floating(tvs, what="task vectors")
    check_floating(merged, what="merged")
    check_finite(tvs, what="task vectors")
    check_finite(merged, what="merged")


def _checked_ratio(numerator: jax.Array, denominator: jax.Array, *, rule: str, what_num: str,
                   what_den: str) -> jax.Array:
    if not (_is_tracer(numerator) or _is_tracer(denominator)):
        if float(denominator) <= 0.0:
            raise SubboostError(f"{rule}: {what_den} is zero, so no alpha matches it.")
        if float(numerator) <= 0.0:
            raise SubboostError(f"{rule}: {what_num} is zero (all experts' task vectors are zero).")
    return numerator / denominator


def alpha_from_norm(tvs: PyTree, merged: PyTree, *, reduce: Reduce = "mean", validate: bool = True) -> jax.Array:
    """``alpha = reduce_t ||tau_t||_F / ||tau_merged||_F`` (see the module docstring).

    Args:
      tvs: stacked task vectors (leading expert axis T >= 1), e.g. `subboost.task_vectors`.
      merged: the merged task vector (structure of one expert), e.g. `subboost.merge`'s output.
      reduce: ``"mean"`` (default) or ``"max"`` over the experts' norms.
      validate: check structure, dtypes and finiteness first (skipped under tracing).

    Returns:
      A float32 scalar array (float64 under x64 with float64 input).
    """
    check_choice("reduce", reduce, _REDUCES, what="alpha_from_norm")
    leaves = jax.tree_util.tree_leaves(tvs)
    if validate and not any(_is_tracer(x) for x in leaves + jax.tree_util.tree_leaves(merged)):
        _check_inputs(tvs, merged)
    dtype = jnp.result_type(jnp.float32, *leaves)
    expert_sq = sum(jnp.sum(jnp.square(x.astype(dtype)).reshape(x.shape[0], -1), axis=1) for x in leaves)
    merged_sq = sum(jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree_util.tree_leaves(merged))
    norms = jnp.sqrt(expert_sq)
    target = jnp.mean(norms) if reduce == "mean" else jnp.max(norms)
    return _checked_ratio(target, jnp.sqrt(merged_sq), rule="alpha_from_norm", what_num="the experts' norm",
                          what_den="the merged task vector's norm")


def alpha_from_hogsvd(
    tvs: PyTree,
    merged: PyTree,
    *,
    target: Reduce = "max",
    pi: float | None = None,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
    validate: bool = True,
) -> jax.Array:
    """Alpha matching the merged task vector's generalized singular values to the experts' (module docstring).

    Args:
      tvs: stacked task vectors (leading expert axis T >= 2).
      merged: the merged task vector (structure of one expert).
      target: per direction, the experts' ``"max"`` (default) or ``"mean"`` generalized singular value.
      pi: the robust HO-GSVD's regulariser (default ``1/T``, `subboost.hogsvd.hogsvd`).
      attention, is_matrix: how matrices are read (`subboost.tree`).
      batch_size: layers of a group decomposed at once (``None`` = all).
      validate: check structure, dtypes and finiteness first (skipped under tracing).

    Returns:
      A scalar array in the HO-GSVD's dtype (float32, or float64 under x64).
    """
    check_choice("target", target, _REDUCES, what="alpha_from_hogsvd")
    traced = any(_is_tracer(x) for x in jax.tree_util.tree_leaves((tvs, merged)))
    if validate and not traced:
        if num_experts(tvs) < 2:
            raise SubboostError(f"alpha_from_hogsvd needs T >= 2 experts (the HO-GSVD of one matrix is its SVD); "
                                f"got {num_experts(tvs)}.")
        _check_inputs(tvs, merged)
    sigmas = generalized_singular_values(tvs, merged, method="robust", pi=pi, attention=attention,
                                         is_matrix=is_matrix, batch_size=batch_size, validate=False)
    if not sigmas:
        raise SubboostError("alpha_from_hogsvd: the task vectors hold no matrix layer.")
    target_sq, merged_sq = 0.0, 0.0
    for sigma in sigmas.values():  # (..., T + 1, n), the merged row last
        experts, projected = sigma[..., :-1, :], sigma[..., -1, :]
        t = jnp.max(experts, axis=-2) if target == "max" else jnp.mean(experts, axis=-2)
        target_sq = target_sq + jnp.sum(jnp.square(t))
        merged_sq = merged_sq + jnp.sum(jnp.square(projected))
    return _checked_ratio(jnp.sqrt(target_sq), jnp.sqrt(merged_sq), rule="alpha_from_hogsvd",
                          what_num="the experts' generalized singular values",
                          what_den="the merged task vector's component in the experts' HO-GSVD basis")
