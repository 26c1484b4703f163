"""Higher-order generalized SVD (HO-GSVD): one right basis shared by N matrices.

Given N matrices ``A_i`` of shape ``(m_i, n)`` (e.g. one layer's task vectors of
N experts), the HO-GSVD writes every one of them with the same right factor::

    A_i = U_i diag(sigma_i) V^T        i = 1..N,  V: (n, n) shared, invertible

so that ``sigma_{i,k}`` says how much of matrix i lives along direction
``V[:, k]``, comparably across matrices. Eigenvalues ``lambda`` of the defining
symmetric problem classify each direction: *common* to all N (``lambda`` at its
minimum), *isolated* in one matrix (``lambda`` at its maximum), or in between.

Robust variant (Kempf, Goulart & Duncan 2021, arXiv 2102.09822; the default,
because real task matrices are often rank-deficient)::

    A = [A_1; ...; A_N] = Q R                 thin QR (A padded with zero rows to >= n rows)
    T = 1/N sum_i (Q_i^T Q_i + pi I)^{-1}     pi > 0, default 1/N
    T = Z diag(lambda) Z^T                    symmetric: `jnp.linalg.eigh`, lambda ascending
    B_i = Q_i Z,  sigma_{i,k} = ||B_i[:, k]||,  U_i = B_i / sigma_i,  V = R^T Z

    common:   lambda = 1 / (1/N + pi)         (the minimum)
    isolated: lambda = (N-1)/(N pi) + 1/(N (1 + pi))

Every column of ``sigma`` then has unit norm over the N matrices
(``sum_i sigma_{i,k}^2 = 1``): it is the distribution of direction k over the
matrices. A rank-revealing step makes the result canonical when the stacked
``A`` itself is rank-deficient (``rank r < n``, always the case when
``sum_i m_i < n``; Kempf et al. assume a full-rank stack): with ``R = P
diag(s) W^T``, singular values ``s_k <= rank_rtol * s_0`` mark directions
absent from every ``A_i``; their columns of ``Q P`` are set to zero, so they get
``lambda = 1/pi`` (above every other value), ``sigma = 0`` in every matrix, and
``V[:, k]`` a unit vector of the common null space. In formulas ``V = W diag(s')
Z`` with ``s'`` = ``s`` on the kept directions and 1 on the absent ones.

Repeated eigenvalues (several common directions, or directions isolated in
different matrices) leave ``Z`` free up to a rotation inside each eigenspace;
a tie-break makes it canonical by splitting such eigenspaces with ``sum_i w_i
Q_i^T Q_i`` for fixed distinct weights (`_resolve_degenerate`), so directions
isolated in different matrices stay apart.

Classic variant (Ponnapalli, Saunders, Van Loan & Alter 2011)::

    D_i = A_i^T A_i,   S = 1/(N(N-1)) sum_{i != j} D_i D_j^{-1},   S V = V diag(lambda)
    B_i = A_i V^{-T},  sigma_{i,k} = ||B_i[:, k]||,  U_i = B_i / sigma_i

with unit-norm columns of ``V``; ``lambda >= 1`` and ``lambda = 1`` marks a common
direction. It needs every ``D_i`` invertible (each ``A_i`` of full column
rank, so ``m_i >= n``) and squares condition numbers. ``S`` is not symmetric,
so its eigenvectors are computed from the similar symmetric problem
``sum_i D_i = L L^T``, ``L^T (sum_j D_j^{-1}) L = Y diag(mu) Y^T``, ``V = L Y``
(normalised), ``lambda = (mu - N) / (N (N-1))`` -- the same eigenpairs, since
``S = (D sum_j D_j^{-1} - N I) / (N (N-1))`` with ``D = sum_i D_i``.

Precision: everything runs in at least float32 (bfloat16/float16 inputs are
computed and returned in float32). For float64 enable it before creating arrays
(``jax.config.update("jax_enable_x64", True)``, ``JAX_ENABLE_X64=1``, or a
``with jax.enable_x64(True):`` block) and pass float64 matrices; results come
back in float64. The classic variant squares condition numbers, so it is the
one that needs float64 first.

`hogsvd` is jit-compatible (``method``, ``pi`` and tolerances are static);
under tracing, value checks (finiteness, classic's invertibility) cannot raise
and are skipped -- call it eagerly to get them. `hogsvd_layers` decomposes
every matrix layer of stacked task vectors, one batched call per group of
same-shaped layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from subboost import linalg
from subboost.compilation import size_aware_jit
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite, check_floating, num_experts
from subboost.tree import AttentionMode, PyTree, matrix_plan
from subboost.validation import check_int

Method = Literal["robust", "classic"]
METHODS: tuple[str, ...] = ("robust", "classic")


class HOGSVD(NamedTuple):
    """Result of `hogsvd`: ``A_i = U[i] @ diag(sigma[i]) @ V.T`` (a pytree).

    Batch axes of the input (if any) lead every field.

    Attributes:
      U: left factors with unit-norm columns (zero columns where ``sigma`` is 0):
        a stacked array ``(N, m, n)`` when the input was a stacked array, else a
        list of N arrays ``(m_i, n)``. ``None`` with ``compute_u=False``.
      sigma: generalized singular values ``(N, n)``, >= 0.
      V: shared right factor ``(n, n)``; column k is direction k.
      eigenvalues: ``lambda`` ``(n,)``, ascending (common directions first); robust:
        of ``T``, classic: of ``S``.
      common: boolean mask ``(n,)`` of directions common to all matrices.
    """

    U: Any
    sigma: jax.Array
    V: jax.Array
    eigenvalues: jax.Array
    common: jax.Array


def common_eigenvalue(num_matrices: int, pi: float) -> float:
    """Robust ``lambda`` of a direction shared equally by all N matrices (the minimum)."""
    return 1.0 / (1.0 / num_matrices + pi)


def isolated_eigenvalue(num_matrices: int, pi: float) -> float:
    """Robust ``lambda`` of a direction present in exactly one matrix (the maximum)."""
    n = num_matrices
    return (n - 1) / (n * pi) + 1.0 / (n * (1.0 + pi))


# ----------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------
def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_blocks(mats: Any) -> tuple[list[jax.Array] | jax.Array, bool]:
    """``mats`` -> (stacked array ``(*b, N, m, n)`` or list of ``(*b, m_i, n)``, stacked?)."""
    if isinstance(mats, (list, tuple)):
        blocks = [jnp.asarray(a) for a in mats]
        stacked = False
        shapes = [tuple(a.shape) for a in blocks]
        num = len(blocks)
    elif hasattr(mats, "shape") and hasattr(mats, "dtype"):
        blocks = jnp.asarray(mats)
        stacked = True
        if blocks.ndim < 3:
            raise SubboostError(
                f"hogsvd: a stacked input needs shape (N, m, n) (optionally with leading batch axes), "
                f"got shape {tuple(blocks.shape)}; pass a list for matrices of different row counts."
            )
        num = blocks.shape[-3]
        shapes = [tuple(blocks.shape[:-3]) + tuple(blocks.shape[-2:])] * num
    else:
        raise SubboostError(
            f"hogsvd: mats must be a list of (m_i, n) arrays or a stacked (N, m, n) array, got {type(mats).__name__}."
        )
    if num < 2:
        raise SubboostError(f"hogsvd needs at least 2 matrices, got {num}.")
    for i, shape in enumerate(shapes):
        if len(shape) < 2:
            raise SubboostError(f"hogsvd: matrix {i} has shape {shape}; every matrix needs 2 dimensions (m_i, n).")
        if shape[-2] == 0 or shape[-1] == 0:
            raise SubboostError(f"hogsvd: matrix {i} has shape {shape}; matrices must not be empty.")
    if len({s[-1] for s in shapes}) != 1:
        bad = next(i for i, s in enumerate(shapes) if s[-1] != shapes[0][-1])
        raise SubboostError(
            "hogsvd: all matrices need the same number of columns n; "
            f"matrix 0 has shape {shapes[0]}, matrix {bad} has shape {shapes[bad]}."
        )
    if len({s[:-2] for s in shapes}) != 1:
        bad = next(i for i, s in enumerate(shapes) if s[:-2] != shapes[0][:-2])
        raise SubboostError(
            "hogsvd: all matrices need the same leading batch axes; "
            f"matrix 0 has shape {shapes[0]}, matrix {bad} has shape {shapes[bad]}."
        )
    arrays = [blocks] if stacked else blocks
    for i, a in enumerate(arrays):
        if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
            raise SubboostError(f"hogsvd: matrix {i} has dtype {a.dtype}; only real matrices are supported.")
    return blocks, stacked


@size_aware_jit
def _finite_flags(blocks: list[jax.Array] | jax.Array) -> jax.Array:
    """One flag per matrix (axis -3 of a stacked array, or per list entry), in one fused call."""
    if isinstance(blocks, (list, tuple)):
        return jnp.stack([jnp.all(jnp.isfinite(a)) for a in blocks])
    return jnp.all(jnp.isfinite(blocks), axis=tuple(i for i in range(blocks.ndim) if i != blocks.ndim - 3))


def _check_finite_blocks(blocks: list[jax.Array] | jax.Array, stacked: bool) -> None:
    flags = np.asarray(_finite_flags(blocks))
    if not flags.all():
        raise SubboostError(f"hogsvd: matrix {int(np.argmin(flags))} contains NaN or infinite values.")


def _resolve_pi(pi: float | None, num: int, method: str) -> float:
    if method not in METHODS:
        raise SubboostError(f"hogsvd: method must be one of {METHODS}, got {method!r}.")
    if pi is None:
        return 1.0 / num
    if method == "classic":
        raise SubboostError("hogsvd: pi is a parameter of the robust method only; leave it None for 'classic'.")
    if isinstance(pi, bool) or not isinstance(pi, (int, float)) or not np.isfinite(pi) or pi <= 0:
        raise SubboostError(f"hogsvd: pi must be a finite number > 0, got {pi!r}.")
    return float(pi)


def _check_tolerances(common_tol: float, rank_rtol: float | None) -> None:
    if not isinstance(common_tol, (int, float)) or not common_tol >= 0:
        raise SubboostError(f"hogsvd: common_tol must be a number >= 0, got {common_tol!r}.")
    if rank_rtol is not None and (not isinstance(rank_rtol, (int, float)) or not 0 <= rank_rtol < 1):
        raise SubboostError(f"hogsvd: rank_rtol must be in [0, 1) or None, got {rank_rtol!r}.")


# ----------------------------------------------------------------------------
# Kernels (batched over leading axes; shapes are static)
# ----------------------------------------------------------------------------
def _row_blocks(x: jax.Array, stacked: bool, rows: Sequence[int]):
    """Splits the stacked rows ``(*b, M', n)`` back into the N blocks."""
    total = sum(rows)
    if stacked:
        return x[..., :total, :].reshape(x.shape[:-2] + (len(rows), rows[0], x.shape[-1]))
    offsets = np.cumsum([0, *rows])
    return [x[..., offsets[i] : offsets[i + 1], :] for i in range(len(rows))]


def _gram(q_blocks, stacked: bool) -> jax.Array:
    """``Q_i^T Q_i`` stacked: ``(*b, N, n, n)``."""
    if stacked:
        return jnp.einsum("...imk,...iml->...ikl", q_blocks, q_blocks)
    return jnp.stack([jnp.einsum("...mk,...ml->...kl", q, q) for q in q_blocks], axis=-3)


def _times(blocks, stacked: bool, z: jax.Array):
    """``X_i @ Z`` for every block."""
    if stacked:
        return jnp.einsum("...imk,...kl->...iml", blocks, z)
    return [b @ z for b in blocks]


def _column_norms_and_units(b, stacked: bool, compute_u: bool):
    if stacked:
        sigma = jnp.linalg.norm(b, axis=-2)  # (*b, N, n)
        safe = jnp.where(sigma > 0, sigma, 1)
        u = b / safe[..., None, :] if compute_u else None
        return u, sigma
    sigmas = [jnp.linalg.norm(x, axis=-2) for x in b]
    u = [x / jnp.where(s > 0, s, 1)[..., None, :] for x, s in zip(b, sigmas)] if compute_u else None
    return u, jnp.stack(sigmas, axis=-2)


def _stack_rows(blocks, stacked: bool) -> tuple[jax.Array, list[int]]:
    if stacked:
        num, m, n = blocks.shape[-3:]
        return blocks.reshape(blocks.shape[:-3] + (num * m, n)), [m] * num
    return jnp.concatenate(blocks, axis=-2), [b.shape[-2] for b in blocks]


def tie_break_weights(num_matrices: int) -> np.ndarray:
    """Distinct weights ``w_i = frac(i * golden ratio)`` in (0, 1) (no small-integer relations between them)."""
    return np.modf(np.arange(1, num_matrices + 1) * (1 + 5**0.5) / 2)[0]


def _resolve_degenerate(lam: jax.Array, z: jax.Array, weighted_gram: jax.Array, condition: jax.Array) -> jax.Array:
    """Picks a canonical basis inside every eigenspace of repeated ``lambda``.

    Eigenvectors of a repeated eigenvalue are only defined up to a rotation,
    and `eigh` returns an arbitrary one -- e.g. when every direction is isolated
    (experts on disjoint subspaces), it would mix directions of different
    matrices. Inside each cluster of numerically equal ``lambda`` (consecutive
    values within ``16 eps sqrt(kappa) max|lambda|``, ``kappa <= 1/eps`` the
    condition number of the stacked matrix: rounding errors in the ``Q_i^T
    Q_i`` grow with it; measured spreads of exactly repeated eigenvalues stay
    well inside this bound) we rotate to the eigenvectors of ``K = sum_i w_i
    Q_i^T Q_i`` (distinct weights, `tie_break_weights`), which separates
    directions belonging to different matrices. Clusters of one direction keep
    their eigenvector (up to sign).
    """
    eps = jnp.finfo(lam.dtype).eps
    kappa = jnp.clip(condition, 1.0, 1.0 / eps)[..., None]
    tol = 16 * eps * jnp.sqrt(kappa) * jnp.max(jnp.abs(lam), axis=-1, keepdims=True)
    breaks = jnp.concatenate([jnp.zeros_like(lam[..., :1]), (jnp.diff(lam, axis=-1) > tol).astype(lam.dtype)], -1)
    cluster = jnp.cumsum(breaks, axis=-1)  # ascending cluster ids, constant inside a cluster
    same = cluster[..., :, None] == cluster[..., None, :]
    g = jnp.swapaxes(z, -1, -2) @ weighted_gram @ z
    g = 0.5 * (g + jnp.swapaxes(g, -1, -2))
    # 0 <= K <= I, so block c's eigenvalues lie in [4c, 4c + 1]: ascending order keeps the clusters' order.
    blocks = jnp.where(same, g, 0) + 4.0 * cluster[..., :, None] * jnp.eye(lam.shape[-1], dtype=lam.dtype)
    _, w = jnp.linalg.eigh(blocks)
    return z @ w


def _robust(blocks, stacked: bool, *, pi: float, common_tol: float, rank_rtol: float | None, compute_u: bool):
    a, rows = _stack_rows(blocks, stacked)
    num, n = len(rows), a.shape[-1]
    if a.shape[-2] < n:  # thin QR must give an (n, n) R: pad with zero rows (a phantom block)
        pad = [(0, 0)] * (a.ndim - 2) + [(0, n - a.shape[-2]), (0, 0)]
        a = jnp.pad(a, pad)
    q, r = linalg.qr(a)  # (*b, M', n), (*b, n, n)
    # Rank-revealing step: R = P diag(s) W^T; directions with s ~ 0 are absent from every A_i.
    p, s, wt = linalg.svd(r)
    rtol = max(a.shape[-2], n) * float(jnp.finfo(s.dtype).eps) if rank_rtol is None else rank_rtol
    keep = s > rtol * s[..., :1]
    q = (q @ p) * keep[..., None, :].astype(q.dtype)
    q_blocks = _row_blocks(q, stacked, rows)
    eye = jnp.eye(n, dtype=q.dtype)
    gram = _gram(q_blocks, stacked)  # Q_i^T Q_i, (*b, N, n, n)
    t = jnp.mean(jnp.linalg.inv(gram + pi * eye), axis=-3)
    lam, z = jnp.linalg.eigh(0.5 * (t + jnp.swapaxes(t, -1, -2)))
    weights = jnp.asarray(tie_break_weights(num), gram.dtype)
    s_min = jnp.min(jnp.where(keep, s, jnp.inf), axis=-1)
    condition = jnp.where(jnp.isfinite(s_min), s[..., 0] / jnp.where(jnp.isfinite(s_min), s_min, 1), 1.0)
    z = _resolve_degenerate(lam, z, jnp.einsum("i,...ikl->...kl", weights, gram), condition)
    u, sigma = _column_norms_and_units(_times(q_blocks, stacked, z), stacked, compute_u)
    scale = jnp.where(keep, s, 1)
    v = jnp.swapaxes(wt, -1, -2) @ (scale[..., :, None] * z)  # R^T Z, unit null-space directions where s ~ 0
    lam_min = common_eigenvalue(num, pi)
    common = jnp.abs(lam - lam_min) <= common_tol * lam_min
    return HOGSVD(U=u, sigma=sigma, V=v, eigenvalues=lam, common=common)


def _classic(blocks, stacked: bool, *, common_tol: float, compute_u: bool):
    if stacked:
        d = jnp.einsum("...imk,...iml->...ikl", blocks, blocks)  # D_i, (*b, N, n, n)
        num = blocks.shape[-3]
    else:
        d = jnp.stack([jnp.einsum("...mk,...ml->...kl", x, x) for x in blocks], axis=-3)
        num = len(blocks)
    d = 0.5 * (d + jnp.swapaxes(d, -1, -2))
    d_sum = jnp.sum(d, axis=-3)
    # The LAPACK calls below are chained with `linalg.after`: one in flight at a time.
    d_inv_sum = jnp.sum(jnp.linalg.inv(d), axis=-3)
    chol = jnp.linalg.cholesky(linalg.after(d_sum, d_inv_sum))  # D = L L^T
    sym = jnp.swapaxes(chol, -1, -2) @ d_inv_sum @ chol
    mu, y = jnp.linalg.eigh(0.5 * (sym + jnp.swapaxes(sym, -1, -2)))
    lam = (mu - num) / (num * (num - 1))
    # Q_i = A_i L^{-T} has Q_i^T Q_i = L^{-1} D_i L^{-T}: the tie-break matrix in these coordinates.
    weights = jnp.asarray(tie_break_weights(num), d.dtype)
    weighted = jnp.einsum("i,...ikl->...kl", weights, d)
    half = jax.lax.linalg.triangular_solve(chol, weighted, left_side=True, lower=True)  # L^{-1} W
    k = jax.lax.linalg.triangular_solve(chol, half, left_side=False, lower=True, transpose_a=True)  # L^{-1} W L^{-T}
    d_sum_eigs = jnp.linalg.eigvalsh(linalg.after(d_sum, (mu, k)))
    condition = d_sum_eigs[..., -1] / jnp.maximum(d_sum_eigs[..., 0], jnp.finfo(d_sum_eigs.dtype).tiny)
    y = _resolve_degenerate(mu, y, k, condition)
    v = chol @ y
    norms = jnp.linalg.norm(v, axis=-2)
    v = v / norms[..., None, :]
    # B_i = A_i V^{-T} = A_i L^{-T} Y diag(norms)
    if stacked:
        chol_b = jnp.broadcast_to(chol[..., None, :, :], blocks.shape[:-2] + chol.shape[-2:])
        a_lt = jax.lax.linalg.triangular_solve(chol_b, blocks, left_side=False, lower=True, transpose_a=True)
    else:
        a_lt = [
            jax.lax.linalg.triangular_solve(chol, x, left_side=False, lower=True, transpose_a=True) for x in blocks
        ]
    b = _times(a_lt, stacked, y * norms[..., None, :])
    u, sigma = _column_norms_and_units(b, stacked, compute_u)
    common = jnp.abs(lam - 1) <= common_tol
    # Reciprocal condition number of every D_i (checked on the host when eager).
    eigs = jnp.linalg.eigvalsh(linalg.after(d, b))
    rcond = eigs[..., 0] / jnp.maximum(eigs[..., -1], jnp.finfo(eigs.dtype).tiny)
    return HOGSVD(U=u, sigma=sigma, V=v, eigenvalues=lam, common=common), rcond


@size_aware_jit(static_argnames=("stacked", "method", "pi", "common_tol", "rank_rtol", "compute_u"))
def hogsvd_kernel(blocks, *, stacked, method, pi, common_tol, rank_rtol, compute_u):
    """The jit-compiled decomposition of already validated input; returns ``(HOGSVD, rcond)``.

    ``rcond`` (classic only, else None): reciprocal condition numbers of the ``D_i``.
    """
    dtype = linalg.compute_dtype(
        blocks.dtype if stacked else functools.reduce(jnp.promote_types, [b.dtype for b in blocks])
    )
    blocks = blocks.astype(dtype) if stacked else [b.astype(dtype) for b in blocks]
    if method == "classic":
        return _classic(blocks, stacked, common_tol=common_tol, compute_u=compute_u)
    result = _robust(blocks, stacked, pi=pi, common_tol=common_tol, rank_rtol=rank_rtol, compute_u=compute_u)
    return result, None


def _check_classic_shapes(blocks, stacked: bool) -> None:
    shapes = [tuple(blocks.shape[-2:])] * blocks.shape[-3] if stacked else [tuple(b.shape[-2:]) for b in blocks]
    for i, (m, n) in enumerate(shapes):
        if m < n:
            raise SubboostError(
                f"hogsvd(method='classic'): matrix {i} has shape {(m, n)}, fewer rows than columns, so "
                "D_i = A_i^T A_i is singular; the classic HO-GSVD needs every A_i of full column rank. "
                "Use method='robust'."
            )


def _check_rcond(rcond: jax.Array, dtype) -> None:
    rcond = np.asarray(rcond)
    limit = 100 * float(jnp.finfo(dtype).eps)
    per_matrix = rcond.reshape(-1, rcond.shape[-1]).min(axis=0) if rcond.ndim > 1 else rcond
    if not np.all(per_matrix > limit):
        i = int(np.argmin(per_matrix))
        raise SubboostError(
            f"hogsvd(method='classic'): D_{i} = A_{i}^T A_{i} of matrix {i} is singular or too ill-conditioned "
            f"in {jnp.dtype(dtype).name} (reciprocal condition number {per_matrix[i]:.2e} <= {limit:.1e}); "
            "the classic HO-GSVD needs every A_i of full column rank. Use method='robust' (or float64)."
        )


def hogsvd(
    mats: Sequence[jax.Array] | jax.Array,
    *,
    method: Method = "robust",
    pi: float | None = None,
    common_tol: float = 1e-4,
    rank_rtol: float | None = None,
    compute_u: bool = True,
    validate: bool = True,
) -> HOGSVD:
    """HO-GSVD ``A_i = U_i diag(sigma_i) V^T`` of N matrices with a shared ``V``.

    Args:
      mats: a list of N >= 2 matrices ``(m_i, n)`` with equal column count, or a
        stacked array ``(N, m, n)``; both may carry equal leading batch axes
        (``(*batch, N, m, n)`` when stacked), decomposed independently.
      method: ``"robust"`` (default; Kempf et al., any ranks) or ``"classic"``
        (Ponnapalli et al.; every ``A_i`` must have full column rank).
      pi: robust regulariser ``pi > 0``; default ``1/N``.
      common_tol: a direction is common when ``|lambda - lambda_min| <= common_tol *
        lambda_min`` (robust, ``lambda_min = 1/(1/N + pi)``) or ``|lambda - 1| <=
        common_tol`` (classic).
      rank_rtol: robust only: singular values of the stacked matrix at most
        ``rank_rtol * s_max`` count as zero; default ``max(M, n) * eps``.
      compute_u: whether to form ``U`` (``None`` otherwise; saves memory when
        only ``sigma`` is needed).
      validate: check finiteness (and, for classic, that every ``D_i`` is
        invertible) with one host sync each. Skipped under `jax.jit` tracing.

    Returns:
      A `HOGSVD` (``U``, ``sigma``, ``V``, ``eigenvalues``, ``common``), in at least
      float32 (float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp
      >>> a = [jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[2.0, 0.0], [0.0, 1.0]])]
      >>> r = hogsvd(a)
      >>> bool(jnp.allclose(r.U[1] @ jnp.diag(r.sigma[1]) @ r.V.T, a[1], atol=1e-5))
      True
      >>> r.common.tolist()  # column 1 is shared equally, column 0 is not
      [True, False]
    """
    blocks, stacked = _as_blocks(mats)
    num = blocks.shape[-3] if stacked else len(blocks)
    pi_value = _resolve_pi(pi, num, method)
    _check_tolerances(common_tol, rank_rtol)
    if method == "classic":
        _check_classic_shapes(blocks, stacked)
    leaves = [blocks] if stacked else blocks
    concrete = not any(_is_tracer(x) for x in leaves)
    if validate and concrete:
        _check_finite_blocks(blocks, stacked)
    result, rcond = hogsvd_kernel(
        blocks,
        stacked=stacked,
        method=method,
        pi=pi_value,
        common_tol=float(common_tol),
        rank_rtol=None if rank_rtol is None else float(rank_rtol),
        compute_u=compute_u,
    )
    if validate and concrete and rcond is not None:
        _check_rcond(rcond, result.sigma.dtype)
    if not stacked and compute_u:
        result = result._replace(U=list(result.U))
    return result


@size_aware_jit
def project(result: HOGSVD, a: jax.Array) -> jax.Array:
    """Generalized singular values of another matrix in the shared basis.

    ``sigma_k = ||(a V^{-T})[:, k]||`` -- for ``a = A_i`` this is ``sigma_i``; for a
    merged task vector (a combination of the ``A_i``) it places the merge in the
    experts' coordinates without changing their decomposition.

    Args:
      result: a `HOGSVD` (batch axes allowed).
      a: ``(*batch, m, n)`` with the batch axes of ``result.V``, or ``(*batch, K, m, n)``.

    Returns:
      ``(*batch, n)`` (or ``(*batch, K, n)``), in the dtype of ``result.V``.
    """
    v = result.V
    a = jnp.asarray(a).astype(v.dtype)
    if a.ndim == v.ndim + 1:
        v = v[..., None, :, :]
    x = jnp.linalg.solve(v, jnp.swapaxes(a, -1, -2))  # V^{-1} a^T = (a V^{-T})^T
    return jnp.linalg.norm(x, axis=-1)


# ----------------------------------------------------------------------------
# Every layer of stacked task vectors
# ----------------------------------------------------------------------------
@size_aware_jit(
    static_argnames=("method", "pi", "common_tol", "rank_rtol", "compute_u", "attention", "is_matrix", "batch_size"),
)
def _hogsvd_groups(tvs, *, method, pi, common_tol, rank_rtol, compute_u, attention, is_matrix, batch_size):
    plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=attention)
    kwargs = dict(stacked=True, method=method, pi=pi, common_tol=common_tol, rank_rtol=rank_rtol, compute_u=compute_u)

    def decompose(x):  # (G, T, m, n) -> (HOGSVD, rcond) with leading G
        result, rcond = hogsvd_kernel(x, **kwargs)
        return result, (jnp.zeros(x.shape[:-3], x.dtype) if rcond is None else jnp.min(rcond, axis=-1))

    mapped = plan.map_groups(decompose, tvs, batch_size=batch_size)
    results = {g: r for g, (r, _) in mapped.items()}
    rconds = {g: c for g, (_, c) in mapped.items()}
    fields = {
        name: plan.split({g: getattr(r, name) for g, r in results.items()}) for name in HOGSVD._fields if name != "U"
    }
    u = plan.split({g: r.U for g, r in results.items()}) if compute_u else None
    out = {
        member: HOGSVD(
            U=None if u is None else u[member],
            **{name: fields[name][member] for name in fields},
        )
        for member in fields["sigma"]
    }
    return out, {member: jnp.min(r) for member, r in plan.split(rconds).items()}


def hogsvd_layers(
    tvs: PyTree,
    *,
    method: Method = "robust",
    pi: float | None = None,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    common_tol: float = 1e-4,
    rank_rtol: float | None = None,
    compute_u: bool = True,
    batch_size: int | None = None,
    validate: bool = True,
) -> dict[str, HOGSVD]:
    """HO-GSVD of every matrix layer of stacked task vectors, across the experts.

    For each matrix (in PyTorch orientation ``(out, in)``, see `subboost.tree`)
    the T experts' matrices ``tau_t`` are decomposed together, so ``N = T``.
    All layers of one shape run in one batched, jit-compiled call.

    Args:
      tvs: stacked task vectors (leading expert axis T >= 2), e.g. from
        `subboost.task_vectors`.
      method, pi, common_tol, rank_rtol, compute_u: as in `hogsvd`.
      attention: ``per_qkv``, ``full`` or ``per_head`` attention matrices.
      is_matrix: matrix predicate (default `subboost.tree.default_is_matrix`).
      batch_size: decompose at most this many layers of a group at once
        (`jax.lax.map`), bounding memory; ``None`` = whole groups.
      validate: check float dtypes and finiteness first (one host sync).

    Returns:
      ``{module path: HOGSVD}`` with ``U (T, m, n)``, ``sigma (T, n)``,
      ``V (n, n)``, ``eigenvalues (n,)``, ``common (n,)``; members holding several
      matrices (scan-stacked layers, heads) carry a leading axis over them.
    """
    pi_value = check_layers_arguments(
        tvs, method=method, pi=pi, attention=attention, is_matrix=is_matrix, common_tol=common_tol,
        rank_rtol=rank_rtol, batch_size=batch_size, validate=validate,
    )
    results, rconds = _hogsvd_groups(
        tvs,
        method=method,
        pi=pi_value,
        common_tol=float(common_tol),
        rank_rtol=None if rank_rtol is None else float(rank_rtol),
        compute_u=compute_u,
        attention=attention,
        is_matrix=is_matrix,
        batch_size=batch_size,
    )
    if method == "classic" and validate:
        check_layers_rcond(rconds, next(iter(results.values())).sigma.dtype)
    return results


def check_layers_arguments(
    tvs: PyTree,
    *,
    method: str,
    pi: float | None,
    attention: str,
    is_matrix: Callable | None,
    common_tol: float,
    rank_rtol: float | None,
    batch_size: int | None,
    validate: bool,
) -> float:
    """Validates the arguments of a per-layer HO-GSVD; returns the resolved ``pi``."""
    num = num_experts(tvs)
    if num < 2:
        raise SubboostError(f"HO-GSVD of task vectors needs at least 2 experts, got {num}.")
    pi_value = _resolve_pi(pi, num, method)
    _check_tolerances(common_tol, rank_rtol)
    if batch_size is not None:
        check_int("batch_size", batch_size, what="HO-GSVD", low=1)
    plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=attention)
    if not plan.members:
        raise SubboostError("the task vectors hold no matrix parameters (check is_matrix).")
    if method == "classic":
        for member in plan.members:
            m, n, _ = member.group
            if m < n:
                raise SubboostError(
                    f"HO-GSVD method='classic': parameter {member.name!r} gives ({m}, {n}) matrices with fewer "
                    "rows than columns, so D_i = A_i^T A_i is singular. Use method='robust'."
                )
    if validate:
        check_floating(tvs, what="task vectors")
        check_finite(tvs, what="task vectors")
    return pi_value


def check_layers_rcond(rconds: dict[str, jax.Array], dtype) -> None:
    """Raises for the first layer whose classic ``D_i`` is (numerically) singular."""
    limit = 100 * float(jnp.finfo(dtype).eps)
    worst = {member: float(r) for member, r in jax.device_get(rconds).items()}
    bad = [member for member, r in worst.items() if not r > limit]
    if bad:
        raise SubboostError(
            f"HO-GSVD method='classic': parameter {bad[0]!r} has an expert matrix whose D_i = A_i^T A_i is "
            f"singular or too ill-conditioned (reciprocal condition number {worst[bad[0]]:.2e} <= {limit:.1e}); "
            "use method='robust'."
        )
