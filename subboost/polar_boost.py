"""Subspace Boosting without a full SVD: polar factor plus the top singular triplets.

With ``tau = U diag(s) V^T`` (``s`` descending) and cutoff value ``s_k``, the
boosted matrix ``U diag(max(s, s_k)) V^T`` splits into a full-rank part and a
rank-``k`` correction::

    tau' = s_k P + sum_{i<k} (s_i - s_k) u_i v_i^T,        P = U V^T,

where ``P`` is the orthogonal polar factor of ``tau``. Nothing here needs the
full spectrum:

* ``P`` comes from QDWH (Nakatsukasa, Bai & Gygi 2010), the dynamically
  weighted Halley iteration ``X <- X (a I + b X^T X)(I + c X^T X)^{-1}``. Its
  weights depend only on a lower bound ``l`` of ``sigma_min / sigma_max``, so
  the whole schedule is fixed at trace time: 4-5 iterations for ``l`` down to
  ``1e-9`` (two QR-based, then Cholesky-based ones), matmuls, one QR or
  Cholesky factorisation each, no data-dependent control flow.
  Newton-Schulz (``X <- 1.5 X - 0.5 X X^T X``), the pure-matmul alternative,
  grows small singular values by only 1.5x per step. Boosting needs exactly
  those right (they are the ones raised to ``s_k``), and in a square merged
  task vector they reach ``1e-4..1e-5`` of ``s_0`` (the synthetic ones of
  experiments/bench_boost.py; a Gaussian square matrix too): 25-30 steps of
  two matmuls each, against QDWH's fixed 4-5 steps.
* The nuclear norm is ``sum(s) = trace(P^T tau)``, an elementwise product.
* The top triplets come from block subspace iteration with Rayleigh-Ritz
  (QR plus the SVD of a ``b x b`` matrix). ``k`` is searched with a growing
  block: the first block holds 16 triplets; if ``cumsum(s)`` over its first
  half does not reach ``beta * sum(s)``, a block of 64 is tried; past that cap
  the matrix goes to the exact SVD path.

Tall matrices (``m >= 1.5 n``) are first reduced by a thin QR ``tau = Q R``:
boosting commutes with the left orthogonal factor, ``boost(Q R) = Q boost(R)``,
so all iterations run on the square ``R``.

Convergence is certified, not assumed. ``P`` is accepted when
``||P^T P - I||_F / sqrt(n) <= tol`` (the iteration keeps singular vectors and
only moves singular values towards 1, so this bounds ``||P - U V^T||_F /
sqrt(n)`` within a factor 2, and hence the relative error of ``s_k P`` in the
boosted matrix, whose norm is at least ``s_k sqrt(n)``); a triplet set is
accepted when every Ritz residual ``||tau^T u_i - s_i v_i||`` for ``i <= k`` is
at most ``triplet_tol * s_k``. A matrix failing either test is reported as not
converged and the caller recomputes it by exact SVD.

Rank-deficient input: the polar factor is not unique there, and neither is
the boosted matrix. Both solvers raise the zero singular values to ``s_k``, but
which orthonormal directions fill the null spaces is arbitrary: LAPACK's choice
in the SVD path; in the polar path, whatever QDWH makes of the rounding noise
there, which it lifts like any other small singular value. Unique, and the same
from both solvers (up to the tolerances): the boosted spectrum
``max(s_i, s_k)``, the action on the row space (``tau' v`` for ``v`` in the
range of ``tau^T``) and the Gram matrices ``tau'^T tau'`` and ``tau' tau'^T``.
Exact structural zeros (a zero row or column) stay exactly zero under QDWH, so
``P^T P`` misses them, the residual test fails and the matrix is recomputed by
the SVD path (reported). A zero matrix stays zero and counts as converged.

``rank_rtol`` (see `subboost.boosting`) makes the rank-deficient case defined
(singular values ``<= rank_rtol * s_0`` stay zero). The polar path detects such
matrices without the spectrum: ``H = P^T tau = V diag(s) V^T`` is symmetric
positive semi-definite, and its Cholesky factorisation after the shift
``- rank_rtol * s_0 * I`` exists exactly when every ``s_i`` exceeds the
threshold (the null-space eigenvalues of ``H`` do not move to first order
with the error of ``P``). Matrices failing it are reported as
``rank-deficient`` and recomputed by the SVD path, which keeps their null
space at zero; the others have nothing to zero and keep the polar result.
The same test with ``max(m, n) * eps`` (when ``rank_rtol`` is ``None``) feeds the
report's ``rank_deficient`` flag.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from subboost import linalg

BoostMode = Literal["cumsum", "index"]

# Block sizes of the growing top-triplet search; the first half of each block
# is usable (the rest is oversampling that speeds up convergence).
BLOCKS: tuple[int, ...] = (16, 64)
# Reason codes in the per-matrix report.
REASONS: tuple[str, ...] = (
    "converged",
    "zero matrix",
    "polar factor not converged (rank-deficient or too ill-conditioned)",
    "cutoff index k beyond the triplet cap",
    "top triplets not converged",
    "non-finite intermediate",
    "rank-deficient at rank_rtol (null space kept at zero by the SVD)",
)
CONVERGED, ZERO, POLAR_FAILED, K_BEYOND_CAP, TRIPLETS_FAILED, NON_FINITE, RANK_DEFICIENT = range(7)
TALL_RATIO = 1.5


def max_cutoff_index(r: int) -> int:
    """Smallest cutoff index ``k`` the polar solver hands to the SVD, for ``r = min(m, n)``.

    The largest block holds ``min(BLOCKS[-1], r)`` triplets; unless that is all
    ``r`` of them, only its first half counts as converged.
    """
    return r if BLOCKS[-1] >= r else BLOCKS[-1] // 2


def default_tolerances(dtype) -> tuple[float, float]:
    """``(polar tol, triplet tol)`` for a compute dtype."""
    if jnp.dtype(dtype) == jnp.float64:
        return 1e-10, 1e-8
    return 1e-4, 1e-3


def default_lower_bound(dtype) -> float:
    """Lower bound of ``sigma_min / ||x||_F`` the QDWH schedule is built for."""
    return 1e-18 if jnp.dtype(dtype) == jnp.float64 else 1e-9


# ----------------------------------------------------------------------------
# Polar factor by QDWH
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def qdwh_schedule(lower_bound: float, eps: float) -> tuple[tuple[float, float, float], ...]:
    """Weights ``(a, b, c)`` of every QDWH step for singular values in ``[l, 1]``.

    With ``d = (4 (1 - l^2) / l^4)^(1/3)``::

        a = sqrt(1 + d) + sqrt(8 - 4 d + 8 (2 - l^2) / (l^2 sqrt(1 + d))) / 2
        b = (a - 1)^2 / 4,   c = a + b - 1,   l <- l (a + b l^2) / (1 + c l^2)

    until ``1 - l < eps``. Every singular value in ``[l, 1]`` then lies in
    ``[1 - eps, 1]``; the last step is (nearly) plain Halley, ``(3, 1, 3)``.
    """
    if not 0.0 < lower_bound < 1.0:
        raise ValueError(f"qdwh_schedule: lower_bound must be in (0, 1), got {lower_bound!r}.")
    steps = []
    l = lower_bound
    while True:
        l2 = l * l
        d = (4.0 * (1.0 - l2) / (l2 * l2)) ** (1.0 / 3.0)
        sqd = math.sqrt(1.0 + d)
        a = sqd + 0.5 * math.sqrt(max(8.0 - 4.0 * d + 8.0 * (2.0 - l2) / (l2 * sqd), 0.0))
        b = (a - 1.0) ** 2 / 4.0
        c = a + b - 1.0
        steps.append((a, b, c))
        l = min(l * (a + b * l2) / (1.0 + c * l2), 1.0)
        if 1.0 - l < eps or len(steps) >= 12:
            return tuple(steps)


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def qdwh(x: jax.Array, *, lower_bound: float) -> jax.Array:
    """QDWH iterate for ``x`` of shape ``(..., m, n)``, ``m >= n``, ``||x||_2 <= 1``.

    Steps with ``c > 100`` factor ``[sqrt(c) X; I] = [Q1; Q2] R`` and set
    ``X <- (b/c) X + (a - b/c) / sqrt(c) Q1 Q2^T`` (stable for large ``c``);
    later ones use the Cholesky factor of ``I + c X^T X``.
    """
    m, n = x.shape[-2:]
    eye = jnp.eye(n, dtype=x.dtype)
    eps = float(jnp.finfo(x.dtype).eps)
    for a, b, c in qdwh_schedule(lower_bound, eps):
        if c > 100.0:
            stacked = jnp.concatenate([math.sqrt(c) * x, jnp.broadcast_to(eye, x.shape[:-2] + (n, n))], axis=-2)
            q, _ = jnp.linalg.qr(stacked, mode="reduced")
            x = (b / c) * x + ((a - b / c) / math.sqrt(c)) * (q[..., :m, :] @ _mT(q[..., m:, :]))
        else:
            chol = jnp.linalg.cholesky(eye + c * (_mT(x) @ x))
            # x (I + c x^T x)^{-1}, via the (symmetric) system for x^T.
            y = jax.scipy.linalg.cho_solve((chol, True), _mT(x))
            x = (b / c) * x + (a - b / c) * _mT(y)
    return x


def orthogonality_residual(p: jax.Array) -> jax.Array:
    """``||P^T P - I||_F / sqrt(n)`` per matrix (``P``: ``(..., m, n)``, ``m >= n``)."""
    n = p.shape[-1]
    gram = _mT(p) @ p
    return jnp.linalg.norm(gram - jnp.eye(n, dtype=p.dtype), axis=(-2, -1)) / math.sqrt(n)


def polar_factor(x: jax.Array, *, lower_bound: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Orthogonal polar factor of every matrix in ``x`` (``(..., m, n)``) by QDWH.

    Returns:
      ``(P, residual)``: ``P`` in the compute dtype with the shape of ``x``
      (orthonormal columns for ``m >= n``, rows otherwise) and
      ``residual = ||P^T P - I||_F / sqrt(min(m, n))`` per matrix, which is
      ``>= sqrt(nullity / min(m, n))`` on rank-deficient input.
    """
    x = x.astype(linalg.compute_dtype(x.dtype))
    wide = x.shape[-2] < x.shape[-1]
    if wide:
        x = _mT(x)
    lower_bound = default_lower_bound(x.dtype) if lower_bound is None else lower_bound
    scale = jnp.linalg.norm(x, axis=(-2, -1), keepdims=True)  # >= ||x||_2
    p = qdwh(x / jnp.where(scale > 0, scale, 1), lower_bound=lower_bound)
    residual = orthogonality_residual(p)
    return (_mT(p) if wide else p), residual


# ----------------------------------------------------------------------------
# Top singular triplets by block subspace iteration
# ----------------------------------------------------------------------------
def index_cutoff(beta: float, rank: int) -> int:
    """The ``index``-mode cutoff of a matrix of rank ``rank``: ``k = min(floor(beta * rank), rank - 1)``.

    Static (a Python int): it depends on the shape only. The one definition, shared by
    `subboost.boosting` (both solvers' cutoffs and the choice of solver) and this module.
    """
    return min(int(beta * rank), rank - 1)


def _cutoff(s: jax.Array, nuclear: jax.Array, beta: float, mode: BoostMode, r: int) -> jax.Array:
    """Cutoff index from the leading Ritz values (``b`` of them); ``>= b`` means 'beyond'."""
    if mode == "index":
        return jnp.full(s.shape[:-1], index_cutoff(beta, r), jnp.int32)
    fraction = jnp.cumsum(s, axis=-1) / jnp.where(nuclear > 0, nuclear, 1)[..., None]
    return jnp.sum(fraction < beta, axis=-1).astype(jnp.int32)


def _triplet_search(
    a: jax.Array,
    v0: jax.Array,
    nuclear: jax.Array,
    *,
    beta: float,
    mode: BoostMode,
    usable: int,
    tol: float,
    max_iterations: int,
):
    """Block subspace iteration on ``a`` (``(G, m, n)``) from the orthonormal start ``v0``.

    Returns ``(u, s, v, k, relative residual, iterations, converged)`` with
    ``u``: ``(G, m, b)``, ``s``: ``(G, b)``, ``v``: ``(G, n, b)``; ``converged``
    means ``k < usable`` and ``max_{i<=k} ||a^T u_i - s_i v_i|| <= tol * s_k``.
    """
    r = min(a.shape[-2:])
    b = v0.shape[-1]

    def rayleigh_ritz(v):
        q, rr = jnp.linalg.qr(a @ v, mode="reduced")
        ur, s, wh = jnp.linalg.svd(rr, full_matrices=False)
        u = q @ ur
        v = v @ _mT(wh)
        z = _mT(a) @ u  # a^T u_i = s_i v_i at convergence; spans the next block
        residual = jnp.linalg.norm(z - v * s[..., None, :], axis=-2)
        return u, s, v, z, residual

    def status(s, residual, it, previous_head):
        k = _cutoff(s, nuclear, beta, mode, r)
        kk = jnp.minimum(k, b - 1)
        s_k = jnp.take_along_axis(s, kk[..., None], axis=-1)[..., 0]
        within = jnp.arange(b) <= kk[..., None]
        worst = jnp.max(jnp.where(within, residual, 0.0), axis=-1)
        relative = worst / jnp.where(s_k > 0, s_k, 1)
        zero = s[..., 0] == 0
        converged = (k < usable) & (relative <= tol) & ~zero
        # k beyond this block and the block's values have settled: a bigger block is needed.
        head = jnp.sum(s[..., :usable], axis=-1)
        settled = jnp.abs(head - previous_head) <= 1e-3 * head
        done = converged | zero | ((k >= usable) & settled & (it >= 3))
        return k, relative, converged, done, head

    u, s, v, z, residual = rayleigh_ritz(v0)
    k, relative, converged, done, head = status(s, residual, 1, jnp.zeros(s.shape[:-1], s.dtype))
    state = (1, u, s, v, z, k, relative, converged, done, head)

    def cond(state):
        it, *_, done, _ = state
        return (it < max_iterations) & ~jnp.all(done)

    def body(state):
        it, _, _, _, z, _, _, _, _, head = state
        v, _ = jnp.linalg.qr(z, mode="reduced")
        u, s, v, z, residual = rayleigh_ritz(v)
        k, relative, converged, done, head = status(s, residual, it + 1, head)
        return (it + 1, u, s, v, z, k, relative, converged, done, head)

    it, u, s, v, _, k, relative, converged, _, _ = jax.lax.while_loop(cond, body, state)
    iterations = jnp.full(s.shape[:-1], it, jnp.int32)
    return u, s, v, k, relative, iterations, converged


def _start_block(p: jax.Array, key: jax.Array, width: int) -> jax.Array:
    """Orthonormal ``(G, n, width)`` start ``orth(P^T Omega)``, ``Omega`` Gaussian ``(m, width)``.

    ``P^T Omega = V (U^T Omega)`` mixes right singular vectors only. Building it
    from ``P`` also orders it after QDWH (see `subboost.linalg.after`).
    """
    omega = jax.random.normal(key, (p.shape[-2], width), p.dtype)
    v, _ = jnp.linalg.qr(_mT(p) @ omega, mode="reduced")
    return v


def _low_rank_part(u, s, v, k):
    """``(s_k, sum_i max(s_i - s_k, 0) u_i v_i^T)`` per matrix."""
    s_k = jnp.take_along_axis(s, jnp.minimum(k, s.shape[-1] - 1)[..., None], axis=-1)
    weights = jnp.maximum(s - s_k, 0.0)
    return s_k[..., 0], (u * weights[..., None, :]) @ _mT(v)


# ----------------------------------------------------------------------------
# The boost
# ----------------------------------------------------------------------------
def boost_matrices_polar(
    x: jax.Array,
    *,
    beta: float,
    mode: BoostMode = "cumsum",
    tol: float | None = None,
    triplet_tol: float | None = None,
    max_iterations: int = 50,
    lower_bound: float | None = None,
    rank_rtol: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Subspace Boosting of a stack ``(..., m, n)`` by polar factor + top triplets.

    ``tau' = s_k P + sum_{i<k} (s_i - s_k) u_i v_i^T`` (see the module docstring).

    Args:
      x: matrices ``(..., m, n)``.
      beta, mode: as in `subboost.boosting.subspace_boost`.
      tol: accepted ``||P^T P - I||_F / sqrt(n)`` (default ``1e-4`` in float32).
      triplet_tol: accepted Ritz residual relative to ``s_k`` (default ``1e-3``).
      max_iterations: subspace iterations per block size.
      lower_bound: ``sigma_min / ||x||_F`` the QDWH schedule covers.
      rank_rtol: singular values ``<= rank_rtol * s_0`` are zeros to keep;
        matrices having any are not converged (reason ``rank-deficient``).

    Returns:
      ``(boosted, info)``: ``boosted`` has the shape and dtype of ``x``;
      ``info`` holds per-matrix arrays (shape ``x.shape[:-2]``): ``converged``
      (bool), ``reason`` (int8 index into `REASONS`), ``k`` (int32),
      ``polar_residual``, ``triplet_residual``, ``iterations`` and
      ``rank_deficient`` (bool). Entries not
      converged are NOT usable: the caller must recompute them exactly.
    """
    dtype = linalg.compute_dtype(x.dtype)
    default_tol, default_triplet_tol = default_tolerances(dtype)
    tol = default_tol if tol is None else tol
    triplet_tol = default_triplet_tol if triplet_tol is None else triplet_tol
    lower_bound = default_lower_bound(dtype) if lower_bound is None else lower_bound

    batch_shape, (m, n) = x.shape[:-2], x.shape[-2:]
    a = x.astype(dtype).reshape((-1, m, n))
    wide = m < n
    if wide:
        a = _mT(a)
    rows, cols = a.shape[-2:]
    r = cols

    # Scale to ||a||_F = 1: QDWH wants ||a||_2 <= 1; boosting is scale-equivariant.
    scale = jnp.linalg.norm(a, axis=(-2, -1))
    zero = scale == 0
    a = a / jnp.where(zero, 1, scale)[:, None, None]
    q_tall = None
    if rows >= TALL_RATIO * cols:
        q_tall, a = jnp.linalg.qr(a, mode="reduced")  # boost(Q R) = Q boost(R)

    p = qdwh(a, lower_bound=lower_bound)
    polar_residual = orthogonality_residual(p)
    nuclear = jnp.sum(p * a, axis=(-2, -1))  # trace(P^T a) = sum(s)

    # Growing block search for k and the top-k triplets.
    k_static = index_cutoff(beta, r) if mode == "index" else None
    keys = jax.random.split(jax.random.PRNGKey(0), len(BLOCKS))
    blocks = sorted({min(bsz, r) for bsz in BLOCKS})
    if k_static is not None:
        # The block must hold k + 1 usable triplets; past the cap every matrix
        # reports 'k beyond cap' (callers route such groups to the SVD up front).
        blocks = [bsz for bsz in blocks if bsz == r or bsz // 2 > k_static] or blocks[-1:]

    def usable_of(bsz):
        return bsz // 2 if bsz < r else r

    def run_block(i, previous_v):
        bsz = blocks[i]
        if previous_v is None:
            start = _start_block(p, keys[i], bsz)
        else:
            # Warm start: keep the previous block's Ritz vectors, add fresh directions.
            fresh = _start_block(p, keys[i], bsz - previous_v.shape[-1])
            start, _ = jnp.linalg.qr(jnp.concatenate([previous_v, fresh], axis=-1), mode="reduced")
        u, s, v, k, rel, its, conv = _triplet_search(
            a, start, nuclear, beta=beta, mode=mode, usable=usable_of(bsz), tol=triplet_tol,
            max_iterations=max_iterations,
        )
        s_k, low_rank = _low_rank_part(u, s, v, k)
        return v, (s_k, low_rank, k, rel, its, s[..., 0], conv)

    v, result = run_block(0, None)
    for i in range(1, len(blocks)):
        # Only when some matrix needs it: lax.cond runs one branch.
        def bigger(args, i=i):
            v, result = args
            _, new = run_block(i, v)
            keep = result[-1] | zero
            merged = tuple(
                jnp.where(keep.reshape(keep.shape + (1,) * (old.ndim - 1)), old, fresh)
                for old, fresh in zip(result, new)
            )
            # Iterations add up over the block sizes tried.
            merged = merged[:4] + (jnp.where(keep, result[4], result[4] + new[4]),) + merged[5:]
            return v, merged

        v, result = jax.lax.cond(jnp.all(result[-1] | zero), lambda args: args, bigger, (v, result))
    s_k, low_rank, k, triplet_residual, iterations, s_0, triplets_ok = result

    # Numerical rank test on H = P^T a (symmetric PSD, eigenvalues = singular values).
    h = _mT(p) @ a
    h = 0.5 * (h + _mT(h))
    shift = linalg.rank_tolerance((m, n), dtype, rank_rtol) * s_0
    chol = jnp.linalg.cholesky(h - shift[:, None, None] * jnp.eye(cols, dtype=h.dtype))
    deficient = ~jnp.all(jnp.isfinite(chol), axis=(-2, -1)) & ~zero

    boosted = s_k[:, None, None] * p + low_rank
    if q_tall is not None:
        boosted = q_tall @ boosted
    boosted = boosted * scale[:, None, None]
    finite = jnp.all(jnp.isfinite(boosted), axis=(-2, -1))
    polar_ok = polar_residual <= tol
    k_full = jnp.minimum(k, r - 1)
    k_beyond = k >= usable_of(blocks[-1])
    to_zero = deficient if rank_rtol is not None else jnp.zeros_like(deficient)
    reason = jnp.select(
        [zero, to_zero, ~polar_ok, k_beyond, ~triplets_ok, ~finite],
        [ZERO, RANK_DEFICIENT, POLAR_FAILED, K_BEYOND_CAP, TRIPLETS_FAILED, NON_FINITE],
        CONVERGED,
    ).astype(jnp.int8)
    converged = zero | (polar_ok & triplets_ok & finite & ~to_zero)
    boosted = jnp.where(zero[:, None, None], 0.0, boosted)
    if wide:
        boosted = _mT(boosted)
    info = {
        "converged": converged,
        "reason": reason,
        "k": jnp.where(zero, 0, k_full).astype(jnp.int32),
        "polar_residual": jnp.where(zero, 0.0, polar_residual),
        "triplet_residual": jnp.where(zero, 0.0, triplet_residual),
        "iterations": iterations,
        "rank_deficient": deficient,
    }
    info = {name: value.reshape(batch_shape) for name, value in info.items()}
    return boosted.reshape(x.shape).astype(x.dtype), info
