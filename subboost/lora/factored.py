"""Merging LoRA updates in the joint space of their factors: every SVD is (T r) x (T r).

Task t's update of one ``(m, n)`` module is ``tau_t = B_t A_t`` (the scale folded
into ``B_t``), ``B_t: (m, r_t)``, ``A_t: (r_t, n)``. With thin QRs of the stacked
factors::

    [B_1 .. B_T]     = Q_B R_B        Q_B: (m, k_B),  k_B = min(m, R),  R = sum_t r_t
    [A_1 .. A_T]^T   = Q_A R_A        Q_A: (n, k_A)
    tau_t            = Q_B C_t Q_A^T,  C_t = R_B[:, t] R_A[:, t]^T     (k_B, k_A) core

every task vector lives in ``span(Q_B) x span(Q_A)``. Since ``Q_B`` and ``Q_A`` have
orthonormal columns, an SVD ``C = U S V^T`` of a core gives the SVD
``(Q_B U) S (Q_A V)^T`` of the dense matrix, and ``polar(Q_B X) = Q_B polar(X)``:
TA, TSV-M, Iso-C, Iso-CTS and Subspace Boosting run on the cores and return a
merged core ``M`` with merged update ``Q_B M Q_A^T``; no ``m x n`` matrix is formed.

What the dense methods leave undetermined. A LoRA update has rank ``<= r``: the
dense SVD's singular vectors of its zero singular values are any orthonormal
completion (the SVD routine picks one). Dense Iso-C spreads ``mean(s)`` over those
arbitrary directions, dense TSV-M keeps some of them per task before
orthogonalising (``floor(min(m, n) / T)`` triplets per task, usually more than
``r``), dense boosting raises them to ``s_k``. Here every triplet whose singular
value is ``<= rank_rtol`` times the scale of its matrix is dropped (kept at
zero), so results are defined:

* TA, weight averaging: exactly the dense result;
* Iso-C: the dense result projected onto the joint spaces,
  ``Q_B Q_B^T iso_c Q_A Q_A^T``, with the dense scale ``sum(s) / min(m, n)``;
* Subspace Boosting: the dense result with the same ``rank_rtol``
  (`subboost.subspace_boost`), ``k`` computed over all ``min(m, n)`` values;
* TSV-M, Iso-CTS: the dense result whenever each task keeps no more triplets
  than its rank (``floor(min(m, n) / T) <= r_t`` for TSV-M); otherwise the
  dense definition with the undetermined (zero) triplets dropped before the
  polar factors. Sizes (``floor(s / T)``, Iso-CTS's ``c`` and ``p``) use the
  full ``s = min(m, n)``.

Cores of same-shaped modules with the same ranks are stacked on a leading
group axis ``G`` and merged by one jit-compiled call (`merge_group`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subboost import linalg
from subboost.boosting import BOOST_MODES, cutoff_index
from subboost.errors import SubboostError
from subboost.merging.iso import iso_cts_sizes
from subboost.merging.tsv import orthogonalise, tsv_rank

# Methods with a factored form, and boosting.
FACTORED_METHODS: tuple[str, ...] = ("task_arithmetic", "weight_averaging", "tsv", "iso_c", "iso_cts")


def task_mask(ranks: Sequence[int]) -> np.ndarray:
    """``(T, R)`` 0/1 matrix: entry ``(t, j)`` is 1 when column ``j`` of ``[B_1 .. B_T]`` is task t's."""
    mask = np.zeros((len(ranks), sum(ranks)), np.float32)
    offset = 0
    for t, r in enumerate(ranks):
        mask[t, offset: offset + r] = 1
        offset += r
    return mask


def joint_bases(b: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(Q_B, R_B, Q_A, R_A)``: thin QRs ``[B_1 .. B_T] = Q_B R_B`` and ``[A_1 .. A_T]^T = Q_A R_A``.

    Args:
      b: ``(..., m, R)``, the scaled ``B_t`` side by side (task after task).
      a: ``(..., R, n)``, the ``A_t`` stacked row-wise in the same order.
    """
    q_b, r_b = linalg.qr(b)
    q_a, r_a = linalg.qr(linalg.after(jnp.swapaxes(a, -1, -2), r_b))  # one LAPACK call at a time
    return q_b, r_b, q_a, r_a


def task_cores(r_b: jax.Array, r_a: jax.Array, ranks: Sequence[int]) -> jax.Array:
    """``C (..., T, k_B, k_A)`` with ``C_t = R_B[:, block t] R_A[:, block t]^T``, so ``B_t A_t = Q_B C_t Q_A^T``."""
    mask = jnp.asarray(task_mask(ranks), r_b.dtype)
    return jnp.einsum("...ir,tr,...jr->...tij", r_b, mask, r_a)


def joint_cores(b: jax.Array, a: jax.Array, ranks: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(Q_B, C, Q_A)`` of stacked factors: ``B_t A_t = Q_B C_t Q_A^T`` (`joint_bases`, `task_cores`).

    Returns:
      ``Q_B (..., m, k_B)``, ``C (..., T, k_B, k_A)``, ``Q_A (..., n, k_A)`` in the
      compute dtype (>= float32).
    """
    q_b, r_b, q_a, r_a = joint_bases(b, a)
    return q_b, task_cores(r_b, r_a, ranks), q_a


def _tolerance(shape: tuple[int, int], dtype, rank_rtol: float | None) -> float:
    return linalg.rank_tolerance(shape, dtype, rank_rtol)


def _triplets_kept(s: jax.Array, scale: jax.Array, tol: float) -> jax.Array:
    """1.0 for singular values above ``tol * scale`` (the determined triplets), else 0.0."""
    return (s > tol * scale[..., None]).astype(s.dtype)


def iso_c_core(cores: jax.Array, *, shape: tuple[int, int], rank_rtol: float | None = None) -> jax.Array:
    """Iso-C on cores ``(..., T, k_B, k_A)``: ``(sum(s) / min(m, n)) U_+ V_+^T`` of the summed core."""
    return flat_spectrum_core(jnp.sum(cores, axis=-3), shape=shape, rank_rtol=rank_rtol)


def flat_spectrum_core(total: jax.Array, *, shape: tuple[int, int], rank_rtol: float | None = None) -> jax.Array:
    """Iso-C of a summed core ``(..., k_B, k_A)``: determined singular values replaced by ``sum(s) / min(m, n)``."""
    u, s, vh = linalg.svd(total)
    keep = _triplets_kept(s, s[..., 0], _tolerance(shape, s.dtype, rank_rtol))
    level = jnp.sum(s * keep, axis=-1) / min(shape)
    return level[..., None, None] * ((u * keep[..., None, :]) @ vh)


def _select(u: jax.Array, s: jax.Array, vh: jax.Array, counts: Sequence[int], keep: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Task t's top ``counts[t]`` triplets (undetermined ones zeroed), concatenated task after task."""
    us, ss, vhs = [], [], []
    for t, count in enumerate(counts):
        k = keep[..., t, :count]
        us.append(u[..., t, :, :count] * k[..., None, :])
        ss.append(s[..., t, :count] * k)
        vhs.append(vh[..., t, :count, :] * k[..., :, None])
    return jnp.concatenate(us, axis=-1), jnp.concatenate(ss, axis=-1), jnp.concatenate(vhs, axis=-2)


def tsv_core(cores: jax.Array, *, shape: tuple[int, int], ranks: Sequence[int],
             rank_rtol: float | None = None) -> jax.Array:
    """TSV-M on cores: per task the top ``min(floor(s / T), r_t)`` determined triplets, polar, reassembled."""
    num_tasks = cores.shape[-3]
    per_task = tsv_rank(*shape, num_tasks)
    if per_task == 0:
        raise SubboostError(f"tsv: a {shape[0]}x{shape[1]} module has min(m, n) = {min(shape)} < T = {num_tasks} "
                            "tasks, so no singular triplet per task can be kept.")
    u, s, vh = linalg.svd(cores)
    counts = [min(per_task, r, s.shape[-1]) for r in ranks]
    keep = _triplets_kept(s, s[..., 0], _tolerance(shape, s.dtype, rank_rtol))
    u_perp, s_hat, vh_perp = orthogonalise(*_select(u, s, vh, counts, keep))
    return linalg.reconstruct(u_perp, s_hat, vh_perp)


def iso_cts_core(cores: jax.Array, *, shape: tuple[int, int], common_space_fraction: float = 0.8,
                 rank_rtol: float | None = None) -> jax.Array:
    """Iso-CTS on cores: common top triplets of the sum, task-specific residual triplets, flat spectrum."""
    num_tasks = cores.shape[-3]
    s_full = min(shape)
    common, per_task = iso_cts_sizes(*shape, num_tasks, common_space_fraction)
    if common < 0 or (per_task == 0 and common_space_fraction < 1.0):
        raise SubboostError(f"iso_cts: a {shape[0]}x{shape[1]} module is too small for T = {num_tasks} tasks "
                            f"at common_space_fraction={common_space_fraction}.")
    tol = _tolerance(shape, cores.dtype, rank_rtol)
    u, s, vh = linalg.svd(jnp.sum(cores, axis=-3))
    width = s.shape[-1]
    c = min(common, width)
    keep_c = _triplets_kept(s[..., :c], s[..., 0], tol)
    u_c, s_c, vh_c = u[..., :c] * keep_c[..., None, :], s[..., :c] * keep_c, vh[..., :c, :] * keep_c[..., :, None]
    if per_task == 0:
        u_hat, s_hat, vh_hat, keep = u_c, s_c, vh_c, keep_c
    else:
        residual = cores - u_c[..., None, :, :] @ (jnp.swapaxes(u_c, -1, -2)[..., None, :, :] @ cores)
        u_t, s_t, vh_t = linalg.svd(linalg.after(residual, s))
        norms = jnp.sqrt(jnp.sum(cores * cores, axis=(-2, -1)))  # a residual of noise only is dropped
        keep_t = _triplets_kept(s_t, norms, tol)
        p = min(per_task, width)
        u_t, s_t, vh_t = _select(u_t, s_t, vh_t, [p] * num_tasks, keep_t)
        keep = jnp.concatenate([(s_t > 0).astype(s.dtype), keep_c], axis=-1)
        u_hat = jnp.concatenate([u_t, u_c], axis=-1)
        s_hat = jnp.concatenate([s_t, s_c], axis=-1)
        vh_hat = jnp.concatenate([vh_t, vh_c], axis=-2)
    u_perp, s_hat, vh_perp = orthogonalise(u_hat, s_hat, vh_hat)
    level = jnp.sum(s_hat, axis=-1) / s_full
    return level[..., None, None] * ((u_perp * keep[..., None, :]) @ vh_perp)


def boost_core(core: jax.Array, *, shape: tuple[int, int], beta: float, mode: str = "cumsum",
               rank_rtol: float | None = None) -> jax.Array:
    """Subspace Boosting of a merged core ``(..., k_B, k_A)`` as of its ``m x n`` matrix.

    Singular values ``<= tol * s_0`` stay zero (``tol = rank_rtol``, default
    ``max(m, n) * eps``); ``k`` is computed over the spectrum padded with zeros to
    ``min(m, n)`` values, as the dense SVD sees it; then ``s'_i = max(s_i, s_k)``.
    """
    u, s, vh = linalg.svd(core)
    tol = _tolerance(shape, s.dtype, rank_rtol)
    s = jnp.where(s > tol * s[..., :1], s, 0)
    padded = jnp.concatenate([s, jnp.zeros(s.shape[:-1] + (min(shape) - s.shape[-1],), s.dtype)], axis=-1)
    k = cutoff_index(padded, beta=beta, mode=mode)
    s_k = jnp.take_along_axis(padded, k[..., None], axis=-1)
    boosted = jnp.where(s > 0, jnp.maximum(s, s_k), 0)
    return linalg.reconstruct(u, boosted, vh)


def merge_cores(cores: jax.Array, method: str, *, shape: tuple[int, int], ranks: Sequence[int],
                rank_rtol: float | None = None, **kwargs) -> jax.Array:
    """The merged core of ``method`` (one of `FACTORED_METHODS`) from task cores ``(..., T, k_B, k_A)``."""
    if method == "task_arithmetic":
        return jnp.sum(cores, axis=-3)
    if method == "weight_averaging":
        return jnp.mean(cores, axis=-3)
    if method == "iso_c":
        return iso_c_core(cores, shape=shape, rank_rtol=rank_rtol)
    if method == "tsv":
        return tsv_core(cores, shape=shape, ranks=ranks, rank_rtol=rank_rtol)
    if method == "iso_cts":
        return iso_cts_core(cores, shape=shape, rank_rtol=rank_rtol, **kwargs)
    raise SubboostError(f"{method}: no factored form; known: {', '.join(FACTORED_METHODS)} (use the dense path).")


@functools.partial(jax.jit, static_argnames=("ranks", "shape", "method", "method_kwargs", "beta", "mode",
                                             "rank_rtol"))
def merge_group(b: jax.Array, a: jax.Array, previous: jax.Array | None = None, *, ranks: tuple[int, ...],
                shape: tuple[int, int], method: str, method_kwargs: tuple[tuple[str, object], ...] = (),
                beta: float | None = None, mode: str = "cumsum", rank_rtol: float | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One group of same-shaped modules: ``(Q_B, M, Q_A)`` with merged update ``Q_B M Q_A^T``.

    Args:
      b: ``(G, m, R)`` scaled ``B_t`` side by side; ``a``: ``(G, R, n)``.
      previous: the preceding group's result (chained so one LAPACK call runs at a time).
      ranks: ``r_t`` per task.
      shape: ``(m, n)``.
      method: one of `FACTORED_METHODS`; ``method_kwargs`` its hyper-parameters.
      beta: boost the merged core with this cutoff (``None``: no boosting).
      mode, rank_rtol: boosting's cutoff rule and rank tolerance (also the tolerance
        of the SVD merges).
    """
    q_b, r_b, q_a, r_a = joint_bases(linalg.after(b, previous), a)
    if method in ("task_arithmetic", "weight_averaging", "iso_c"):  # only the sum: R_B R_A^T, no per-task cores
        total = r_b @ jnp.swapaxes(r_a, -1, -2)
        core = {"task_arithmetic": lambda: total, "weight_averaging": lambda: total / len(ranks),
                "iso_c": lambda: flat_spectrum_core(total, shape=shape, rank_rtol=rank_rtol)}[method]()
    else:
        core = merge_cores(task_cores(r_b, r_a, ranks), method, shape=shape, ranks=ranks, rank_rtol=rank_rtol,
                           **dict(method_kwargs))
    if beta is not None:
        core = boost_core(core, shape=shape, beta=beta, mode=mode, rank_rtol=rank_rtol)
    return q_b, core, q_a


def check_boost(beta: float | None, mode: str) -> None:
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1):
        raise SubboostError(f"subspace_boost: beta must be in [0, 1], got {beta!r}.")
    if mode not in BOOST_MODES:
        raise SubboostError(f"subspace_boost: mode must be one of {BOOST_MODES}, got {mode!r}.")


__all__ = [
    "FACTORED_METHODS",
    "boost_core",
    "check_boost",
    "iso_c_core",
    "flat_spectrum_core",
    "iso_cts_core",
    "joint_bases",
    "joint_cores",
    "merge_cores",
    "merge_group",
    "task_cores",
    "task_mask",
    "tsv_core",
]
