"""Alignment matrices and expert selection in the HO-GSVD basis.

Per matrix layer, the HO-GSVD of the T experts' task matrices gives every
expert a profile ``sigma_i`` over the shared directions (`subboost.hogsvd`).
Two experts that use the same directions in the same proportions align::

    p_i  = sigma_i / ||sigma_i||          (0 for an expert whose layer is zero)
    M_ij = p_i . p_j                      in [0, 1]; M_ii = 1
    M    = mean of M over all matrix layers

(REFERENCE.md: the paper does not publish its formula; this is ours.) A merged
reference (the merged task vector) can be added as row/column T+1: it is
*projected* onto the experts' basis, ``sigma_ref = ||(tau V^{-T})[:, k]||``
(`subboost.hogsvd.project`), so the experts' own decomposition, and their
block of ``M``, is the same with or without it.

Expert selection picks k of T experts greedily to minimise their total mutual
alignment: first the least aligned pair, then repeatedly the expert with the
smallest summed alignment to those already chosen (ties: lowest index).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from subboost.hogsvd import Method, hogsvd_kernel, check_layers_arguments, check_layers_rcond, project
from subboost.compilation import size_aware_jit
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite, check_floating, check_same_structure, num_experts
from subboost.tree import AttentionMode, PyTree, matrix_plan

Strategy = Literal["hogsvd", "random"]
STRATEGIES: tuple[str, ...] = ("hogsvd", "random")


@size_aware_jit(static_argnames=("method", "pi", "rank_rtol", "attention", "is_matrix", "batch_size"))
def _layer_sigmas(tvs, merged, *, method, pi, rank_rtol, attention, is_matrix, batch_size):
    if merged is not None:
        tvs = jax.tree_util.tree_map(lambda x, r: jnp.concatenate([x, r[None].astype(x.dtype)]), tvs, merged)
    plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=attention)
    kwargs = dict(stacked=True, method=method, pi=pi, common_tol=0.0, rank_rtol=rank_rtol, compute_u=False)

    def sigmas(x):  # (G, K, m, n) -> (G, K, n), (G,)
        experts = x[:, :-1] if merged is not None else x
        result, rcond = hogsvd_kernel(experts, **kwargs)
        rcond = jnp.zeros(x.shape[:1], result.sigma.dtype) if rcond is None else jnp.min(rcond, axis=-1)
        if merged is None:
            return result.sigma, rcond
        return jnp.concatenate([result.sigma, project(result, x[:, -1])[:, None]], axis=1), rcond

    mapped = plan.map_groups(sigmas, tvs, batch_size=batch_size)
    out = {g: sigma for g, (sigma, _) in mapped.items()}
    rconds = {g: rcond for g, (_, rcond) in mapped.items()}
    return plan.split(out), {member: jnp.min(r) for member, r in plan.split(rconds).items()}


def generalized_singular_values(
    tvs: PyTree,
    merged: PyTree | None = None,
    *,
    method: Method = "robust",
    pi: float | None = None,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    rank_rtol: float | None = None,
    batch_size: int | None = None,
    validate: bool = True,
) -> dict[str, jax.Array]:
    """HO-GSVD generalized singular values of every expert, per matrix layer.

    Args:
      tvs: stacked task vectors (leading expert axis T >= 2).
      merged: optional merged task vector (structure of one expert), projected
        onto the experts' shared basis as an extra, last row.
      method, pi, rank_rtol: as in `subboost.hogsvd.hogsvd` (``pi`` defaults to 1/T).
      attention, is_matrix: how matrices are read (see `subboost.tree`).
      batch_size: layers of a group decomposed at once (``None`` = all).
      validate: check structure, dtypes and finiteness first (one host sync).

    Returns:
      ``{module path: sigma}`` with ``sigma`` of shape ``(T, n)``, or
      ``(T + 1, n)`` with the merged reference last; members holding several
      matrices carry a leading axis over them.
    """
    pi_value = check_layers_arguments(
        tvs, method=method, pi=pi, attention=attention, is_matrix=is_matrix, common_tol=0.0,
        rank_rtol=rank_rtol, batch_size=batch_size, validate=validate,
    )
    if merged is not None and validate:
        check_same_structure(
            merged, tvs, what="task vectors", reference_name="merged", lead_shape=(num_experts(tvs),),
            check_dtype=False,
        )
        check_floating(merged, what="merged")
        check_finite(merged, what="merged")
    sigmas, rconds = _layer_sigmas(
        tvs,
        merged,
        method=method,
        pi=pi_value,
        rank_rtol=None if rank_rtol is None else float(rank_rtol),
        attention=attention,
        is_matrix=is_matrix,
        batch_size=batch_size,
    )
    if method == "classic" and validate:
        check_layers_rcond(rconds, next(iter(sigmas.values())).dtype)
    return sigmas


def alignment_from_sigma(sigma: jax.Array) -> jax.Array:
    """``M_ij = p_i . p_j`` with ``p_i = sigma_i / ||sigma_i||`` for ``(..., K, n)`` -> ``(..., K, K)``."""
    norms = jnp.linalg.norm(sigma, axis=-1, keepdims=True)
    p = sigma / jnp.where(norms > 0, norms, 1)
    return jnp.einsum("...in,...jn->...ij", p, p)


@size_aware_jit
def mean_alignment(sigmas: Mapping[str, jax.Array]) -> jax.Array:
    """Mean over all matrices of the per-matrix alignment (``{path: (..., K, n)}`` -> ``(K, K)``)."""
    total, count = 0.0, 0
    for sigma in sigmas.values():
        per_matrix = alignment_from_sigma(sigma).reshape((-1,) + sigma.shape[-2:-1] * 2)
        total = total + jnp.sum(per_matrix, axis=0)
        count += per_matrix.shape[0]
    return total / count


def alignment_matrix(
    tvs: PyTree,
    merged: PyTree | None = None,
    **kwargs,
) -> jax.Array:
    """Alignment matrix of T experts (plus a merged reference), averaged over layers.

    Args:
      tvs: stacked task vectors (leading expert axis T >= 2).
      merged: optional merged task vector, added as the last row/column.
      **kwargs: options of `generalized_singular_values` (method, pi,
        attention, is_matrix, rank_rtol, batch_size, validate).

    Returns:
      ``(T, T)`` (or ``(T + 1, T + 1)``) symmetric matrix in [0, 1]: 1 for
      experts using the shared directions in the same proportions, 0 for
      experts living in disjoint directions.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[1.0, 0.0], [0.0, 0.0]])
      >>> b = jnp.array([[0.0, 0.0], [0.0, 1.0]])
      >>> m = alignment_matrix({"w": {"kernel": jnp.stack([a, a, b])}})
      >>> [[round(float(v), 3) for v in row] for row in m]
      [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    return mean_alignment(generalized_singular_values(tvs, merged, **kwargs))


def total_alignment(alignment: jax.Array | np.ndarray, indices: Sequence[int]) -> float:
    """``sum_{i < j in indices} M_ij``: the quantity `select_experts` minimises."""
    m = np.asarray(alignment)
    idx = list(indices)
    return float(sum(m[i, j] for a, i in enumerate(idx) for j in idx[a + 1 :]))


def _greedy(m: np.ndarray, k: int) -> list[int]:
    num = m.shape[0]
    if k == num:
        return list(range(num))
    off = m.copy()
    np.fill_diagonal(off, np.inf)
    if k == 1:
        return [int(np.argmin(np.where(np.isinf(off), 0, off).sum(axis=1)))]
    i, j = np.unravel_index(int(np.argmin(off)), off.shape)
    chosen = [int(min(i, j)), int(max(i, j))]
    while len(chosen) < k:
        cost = m[:, chosen].sum(axis=1)
        cost[chosen] = np.inf
        chosen.append(int(np.argmin(cost)))
    return chosen


def select_experts(
    tvs: PyTree | None,
    *,
    k: int,
    strategy: Strategy = "hogsvd",
    seed: int = 0,
    alignment: jax.Array | np.ndarray | None = None,
    **kwargs,
) -> list[int]:
    """Chooses ``k`` of the T experts to merge.

    Args:
      tvs: stacked task vectors (leading expert axis T); may be ``None`` when
        ``alignment`` is given.
      k: how many experts to keep, ``1 <= k <= T``.
      strategy: ``"hogsvd"``: greedily minimise the total mutual alignment
        (most diverse set); ``"random"``: a uniform random k-subset, the
        baseline to compare with.
      seed: seed of the random choice (``numpy.random.default_rng``).
      alignment: a precomputed ``(T, T)`` `alignment_matrix` (of the experts
        only) to reuse instead of computing it.
      **kwargs: options of `alignment_matrix` (method, pi, attention, ...).

    Returns:
      The chosen expert indices, ascending.
    """
    if strategy not in STRATEGIES:
        raise SubboostError(f"select_experts: strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if alignment is not None:
        m = np.asarray(alignment, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise SubboostError(f"select_experts: alignment must be a square (T, T) matrix, got shape {m.shape}.")
        if not np.all(np.isfinite(m)):
            raise SubboostError("select_experts: alignment contains NaN or infinite values.")
        num = m.shape[0]
        if tvs is not None and num_experts(tvs) != num:
            raise SubboostError(
                f"select_experts: alignment is {num}x{num} but the task vectors hold {num_experts(tvs)} experts "
                "(pass the experts-only matrix, without a merged reference)."
            )
    else:
        if tvs is None:
            raise SubboostError("select_experts: pass the task vectors or a precomputed alignment matrix.")
        num = num_experts(tvs)
        m = None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num:
        raise SubboostError(f"select_experts: k must be an integer in [1, {num}] (number of experts), got {k!r}.")
    if strategy == "random":
        return sorted(int(i) for i in np.random.default_rng(seed).choice(num, size=int(k), replace=False))
    if m is None:
        m = np.asarray(alignment_matrix(tvs, **kwargs), dtype=np.float64)
    return sorted(_greedy(m, int(k)))
