"""Subspace Boosting (Skorobogat, Roth & Georgescu, 2025, arXiv 2506.16506).

Merging many experts collapses the rank of the merged task vector: a few
common directions dominate its spectrum. Subspace Boosting raises the small
singular values of every merged weight matrix::

    tau = U diag(s) V^T                        (s descending, >= float32)
    k   = min{ i : (s_0 + ... + s_i) / sum(s) >= beta }     ("cumsum" mode)
        = floor(beta * len(s))                               ("index" mode)
    s'_i = max(s_i, s_k)
    tau' = U diag(s') V^T                      (cast back to the input dtype)

``beta = 0`` flattens the whole spectrum to ``s_0``; a zero matrix stays zero.
``attn_beta`` (default: ``beta``) is the cutoff of the attention input
projections (the q/k/v matrices in the layout ``attention=`` selects), like the
authors' separate ``attn_svd_thresh``.

Rank-deficient matrices. With ``k = 0`` (the usual case at the default ``beta``)
every singular value is raised to ``s_0``, exact zeros included, and their
singular vectors are not unique: the result then depends on the SVD's choice
of null-space basis (different on one device and on a mesh, or between
solvers). ``rank_rtol`` makes it defined: singular values ``<= rank_rtol * s_0``
count as exact zeros and stay zero (the cutoff is computed from the others)::

    s'_i = 0                 if s_i <= rank_rtol * s_0
         = max(s_i, s_k)     otherwise

``rank_rtol=None`` (default) is the authors' behaviour. The report flags every
matrix whose numerical rank (tolerance ``rank_rtol``, or
``max(m, n) * eps * s_0`` when it is ``None``) is below ``min(m, n)``.
Boosting commutes with positive scaling, ``boost(a tau) = a boost(tau)``, so one
boost serves a whole sweep over the merging coefficient ``alpha``.

Non-matrix leaves (biases, norms, embeddings, the final projection) pass
through unchanged. All matrices of equal shape are boosted by one batched,
jit-compiled call of the chosen solver:

* ``solver="svd"`` (default): the exact SVD above.
* ``solver="polar"``: ``tau' = s_k P + sum_{i<k} (s_i - s_k) u_i v_i^T`` with
  ``P = U V^T`` from QDWH and the top triplets from subspace iteration
  (`subboost.polar_boost`); matrices on which either does not converge (or
  whose ``k`` passes the triplet cap, or which are rank-deficient) are
  recomputed by the exact SVD inside the same compiled call.
* ``solver="auto"``: per group, by backend, shape and static ``k``
  (`choose_solver`).

``return_info=True`` adds a `BoostReport`: the solver of every group, and per
matrix its ``k``, whether it fell back to the SVD and why, and the residuals.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from subboost import linalg, polar_boost
from subboost.compilation import size_aware_jit
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite, check_floating
from subboost.sharding import mesh_axes, place_parameters
from subboost.tree import AttentionMode, MatrixLayout, PyTree, matrix_plan
from subboost.validation import check_int, check_real, no_matrices_message

BoostMode = Literal["cumsum", "index"]
BOOST_MODES = ("cumsum", "index")


def cutoff_index(s: jax.Array, *, beta: float, mode: BoostMode = "cumsum") -> jax.Array:
    """Index ``k`` of the cutoff singular value, per matrix (``s``: ``(..., r)``, descending).

    ``cumsum``: the first ``i`` with ``sum(s[:i+1]) / sum(s) >= beta``.
    ``index``: ``floor(beta * r)``. Both are clamped to ``r - 1``.
    """
    r = s.shape[-1]
    if mode == "index":
        return jnp.full(s.shape[:-1], polar_boost.index_cutoff(beta, r), jnp.int32)
    total = jnp.sum(s, axis=-1, keepdims=True)
    fraction = jnp.cumsum(s, axis=-1) / jnp.where(total > 0, total, 1)
    # The cumulative fraction is non-decreasing, so the first index reaching
    # beta equals the number of entries still below it.
    k = jnp.sum(fraction < beta, axis=-1).astype(jnp.int32)
    return jnp.minimum(k, r - 1)


def boost_singular_values(s: jax.Array, *, beta: float, mode: BoostMode = "cumsum") -> jax.Array:
    """``s'_i = max(s_i, s_k)`` with ``k = cutoff_index(s, beta, mode)``."""
    k = cutoff_index(s, beta=beta, mode=mode)
    s_k = jnp.take_along_axis(s, k[..., None], axis=-1)
    return jnp.maximum(s, s_k)


def boost_matrices(x: jax.Array, *, beta: float, mode: BoostMode = "cumsum") -> jax.Array:
    """Boosts a stack of matrices ``(..., m, n)``; same shape and dtype out."""
    u, s, vh = linalg.svd(x)
    return linalg.reconstruct(u, boost_singular_values(s, beta=beta, mode=mode), vh).astype(x.dtype)


def check_boost_arguments(beta: float, mode: str) -> None:
    check_real("beta", beta, what="subspace_boost", low=0.0, high=1.0)
    if mode not in BOOST_MODES:
        raise SubboostError(f"subspace_boost: mode must be one of {BOOST_MODES}, got {mode!r}.")


# ----------------------------------------------------------------------------
# Solvers: exact SVD, or polar factor + top triplets (subboost.polar_boost)
# ----------------------------------------------------------------------------
Solver = Literal["svd", "polar", "auto"]
SOLVERS = ("svd", "polar", "auto")
# "auto" never picks the polar solver for matrices with a side shorter than this
# (batched SVD is cheap there), nor on these backends: on CPU, LAPACK's
# divide-and-conquer SVD beat QDWH + subspace iteration for every ViT shape
# measured by experiments/bench_boost.py.
AUTO_POLAR_MIN_SIDE = 128
AUTO_SVD_BACKENDS: frozenset[str] = frozenset({"cpu"})


def choose_solver(solver: Solver, shape: tuple[int, int], *, beta: float, mode: BoostMode,
                  backend: str | None = None) -> str:
    """The solver a group of ``shape`` matrices gets (decided at trace time).

    ``svd`` and ``polar`` are taken as asked, except that ``polar`` in
    ``index`` mode with ``k`` past the triplet cap goes straight to ``svd``
    (it would fall back anyway). ``auto`` picks ``polar`` only off
    `AUTO_SVD_BACKENDS`, for matrices whose shorter side is at least
    `AUTO_POLAR_MIN_SIDE` and whose static ``k`` (``index`` mode) fits the cap;
    in ``cumsum`` mode the ``k`` found at run time can still send single
    matrices to the SVD (see `subspace_boost`'s report).
    """
    r = min(shape)
    if solver == "svd":
        return "svd"
    if mode == "index" and polar_boost.index_cutoff(beta, r) >= polar_boost.max_cutoff_index(r):
        return "svd"
    if solver == "polar":
        return "polar"
    backend = jax.default_backend() if backend is None else backend
    if backend in AUTO_SVD_BACKENDS or r < AUTO_POLAR_MIN_SIDE:
        return "svd"
    return "polar"


def rank_deficient(s: jax.Array, shape: tuple[int, int], rank_rtol: float | None) -> jax.Array:
    """Per matrix: some singular value ``<= tol * s_0`` (and the matrix is not zero)."""
    tol = linalg.rank_tolerance(shape, s.dtype, rank_rtol)
    return (s[..., -1] <= tol * s[..., 0]) & (s[..., 0] > 0)


def _boost_svd_with_cutoff(x: jax.Array, beta: float, mode: BoostMode, rank_rtol: float | None = None
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(boosted, k, rank_deficient)`` by exact SVD."""
    u, s, vh = linalg.svd(x)
    deficient = rank_deficient(s, x.shape[-2:], rank_rtol)
    boosted, k = boosted_spectrum(s, beta=beta, mode=mode, rank_rtol=rank_rtol)
    return linalg.reconstruct(u, boosted, vh).astype(x.dtype), k, deficient


def boosted_spectrum(s: jax.Array, *, beta: float, mode: BoostMode, rank_rtol: float | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """``(s', k)``: the boosted singular values and the cutoff index (module docstring), ``s`` descending."""
    if rank_rtol is not None:
        s = jnp.where(s > rank_rtol * s[..., :1], s, 0)
    k = cutoff_index(s, beta=beta, mode=mode)
    s_k = jnp.take_along_axis(s, k[..., None], axis=-1)
    boosted = jnp.maximum(s, s_k)
    if rank_rtol is not None:
        boosted = jnp.where(s > 0, boosted, 0)  # the numerical null space stays zero
    return boosted, k


def _svd_info(k: jax.Array, deficient: jax.Array) -> dict[str, jax.Array]:
    shape = k.shape
    return {
        "rank_deficient": deficient,
        "converged": jnp.ones(shape, bool),
        "fallback": jnp.zeros(shape, bool),
        "reason": jnp.zeros(shape, jnp.int8),
        "k": k.astype(jnp.int32),
        "polar_residual": jnp.full(shape, jnp.nan, jnp.float32),
        "triplet_residual": jnp.full(shape, jnp.nan, jnp.float32),
        "iterations": jnp.zeros(shape, jnp.int32),
    }


def boost_group(x: jax.Array, *, beta: float, mode: BoostMode, solver: str, tol: float | None = None,
                rank_rtol: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Boosts a group ``(G, m, n)`` with ``solver`` (``svd`` or ``polar``) -> ``(boosted, info)``.

    With ``polar``, every matrix whose polar factor or top triplets did not
    converge is recomputed by exact SVD (inside the same compiled call; a
    `jax.lax.cond` skips the work when all converged) and flagged in
    ``info["fallback"]``: an unconverged result is never returned.
    """
    if solver == "svd":
        y, k, deficient = _boost_svd_with_cutoff(x, beta, mode, rank_rtol)
        return y, _svd_info(k, deficient)
    y, info = polar_boost.boost_matrices_polar(x, beta=beta, mode=mode, tol=tol, rank_rtol=rank_rtol)
    ok = info["converged"]

    def recompute(args):
        def one(item):
            xi, yi, ki, di, oki = item
            return jax.lax.cond(
                oki, lambda: (yi, ki, di),
                lambda: tuple(v[0] for v in _boost_svd_with_cutoff(xi[None], beta, mode, rank_rtol)),
            )

        return jax.lax.map(one, (x,) + args + (ok,))

    y, k, deficient = jax.lax.cond(jnp.all(ok), lambda args: args, recompute,
                                   (y, info["k"], info["rank_deficient"]))
    info = {**info, "k": k, "rank_deficient": deficient, "fallback": ~ok}
    info["polar_residual"] = info["polar_residual"].astype(jnp.float32)
    info["triplet_residual"] = info["triplet_residual"].astype(jnp.float32)
    return y, info


def attention_matrices(plan) -> dict[tuple[int, int, str], np.ndarray]:
    """Per group, which of its matrices come from attention q/k/v kernels (get ``attn_beta``).

    These are the matrices the ``attention=`` mode forms from query/key/value
    kernels: q, k, v (``per_qkv``), the fused ``(3D, D)`` matrix (``full``) or
    each head's (``per_head``). The output projection keeps ``beta``, as in the
    reference code (only ``in_proj`` gets the attention threshold).
    """
    masks = {g: np.zeros(size, bool) for g, size in zip(plan.groups, plan.group_sizes)}
    for member in plan.members:
        if member.layout.is_attention_input:
            masks[member.group][member.offset: member.offset + member.count] = True
    return masks


def group_beta(is_attention: np.ndarray, beta: float, attn_beta: float) -> float:
    """The single beta of a group whose matrices are all attention or all not."""
    return attn_beta if is_attention.size and is_attention.all() else beta


def beta_parts(is_attention: np.ndarray, beta: float, attn_beta: float) -> list[tuple[np.ndarray | None, float]]:
    """``[(matrix indices, cutoff), ...]`` of a group whose attention matrices take ``attn_beta``.

    One part (``None``: the whole group) unless the group mixes both kinds;
    then two static index sets, each boosted with its own static cutoff (so
    every solver and mode applies unchanged) by `subboost.tree.MatrixPlan.map_groups`.
    """
    if attn_beta == beta or not is_attention.any() or is_attention.all():
        return [(None, group_beta(is_attention, beta, attn_beta))]
    return [(np.flatnonzero(is_attention), attn_beta), (np.flatnonzero(~is_attention), beta)]


def beta_can_be_traced(tau: PyTree, *, mode: BoostMode, solver: Solver, attn_beta: float | None) -> bool:
    """Whether `subspace_boost` may pass ``beta`` to its program as a traced scalar, with the same result.

    Only ``cumsum`` mode reads beta at run time alone (``sum(s[:i+1]) / sum(s) < beta``); ``index`` mode
    and the polar solver size arrays or pick code paths from it. One beta for every matrix (no
    ``attn_beta``). Only float32 / float64 matrices: there a traced Python float rounds to the
    matrices' dtype exactly as the constant does; a lower precision would round it twice.
    """
    if mode != "cumsum" or solver != "svd" or attn_beta is not None:
        return False
    return all(jnp.dtype(x.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
               for x in jax.tree_util.tree_leaves(tau))


def _array_predicate(path: str, leaf) -> MatrixLayout:
    """A bare array: its two trailing axes are the matrices, every other axis a layer axis."""
    return MatrixLayout("matrix", layer_axes=len(np.shape(leaf)) - 2)


def _boost_tree_impl(
    tau: PyTree,
    *,
    beta: float,
    mode: BoostMode,
    attention: AttentionMode,
    is_matrix: Callable | None,
    batch_size: int | None,
    solver: Solver = "svd",
    tol: float | None = None,
    with_info: bool = False,
    attn_beta: float | None = None,
    rank_rtol: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """Boosts every matrix group of ``tau`` (a tree, or a bare array with ``is_matrix=_array_predicate``)."""
    plan = matrix_plan(tau, is_matrix=is_matrix, attention=attention)
    attn_beta = beta if attn_beta is None else attn_beta
    masks = attention_matrices(plan)

    def parts(group):  # per group, by shape and cutoff: the solver; by attention mask: the cutoff
        if isinstance(beta, jax.core.Tracer):  # `_boost_tree_traced_beta`: one cutoff, the exact SVD
            return [(None, functools.partial(boost_group, beta=beta, mode=mode, tol=tol, rank_rtol=rank_rtol,
                                             solver="svd"))]
        return [(indices, functools.partial(boost_group, beta=b, mode=mode, tol=tol, rank_rtol=rank_rtol,
                                            solver=choose_solver(solver, group[:2], beta=b, mode=mode)))
                for indices, b in beta_parts(masks[group], beta, attn_beta)]

    mapped = plan.map_groups(None, tau, batch_size=batch_size, mesh=mesh, parts=parts)
    out = plan.rebuild(tau, plan.scatter({g: boosted for g, (boosted, _) in mapped.items()}))
    infos = [info for _, info in mapped.values()]
    if mesh is not None:  # replicated, so every host can read (and process 0 save) the result
        out, infos = jax.lax.with_sharding_constraint((out, infos), NamedSharding(mesh, PartitionSpec()))
    return (out, infos) if with_info else out


_BOOST_STATIC = ("mode", "attention", "is_matrix", "batch_size", "solver", "tol", "with_info", "attn_beta", "rank_rtol",
                 "mesh")
_boost_tree = size_aware_jit(_boost_tree_impl, static_argnames=("beta",) + _BOOST_STATIC)
# beta as a traced argument: every beta of a sweep runs one compiled program.
_boost_tree_traced_beta = size_aware_jit(_boost_tree_impl, static_argnames=_BOOST_STATIC)


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupReport:
    """How one group of same-shaped matrices was boosted (arrays: one entry per matrix).

    Attributes:
      shape: ``(rows, cols)`` of the matrices (PyTorch orientation).
      dtype: their dtype.
      solver: ``"svd"`` or ``"polar"``, as chosen for the group.
      names: one name per matrix (module path; ``[i]`` for stacked layers/heads).
      k: cutoff index per matrix (from the matrix's final solver).
      fallback: matrices the polar solver did not converge on, recomputed by SVD.
      reasons: why each matrix fell back (``"converged"`` otherwise).
      polar_residual: ``||P^T P - I||_F / sqrt(n)`` (NaN for ``svd``).
      triplet_residual: ``max_{i<=k} ||tau^T u_i - s_i v_i|| / s_k`` (NaN for ``svd``).
      iterations: subspace iterations (0 for ``svd``).
      rank_deficient: matrices whose numerical rank is below ``min(m, n)``
        (see `subboost.linalg.rank_tolerance`).
    """

    shape: tuple[int, int]
    dtype: str
    solver: str
    names: tuple[str, ...]
    k: np.ndarray
    fallback: np.ndarray
    reasons: tuple[str, ...]
    polar_residual: np.ndarray
    triplet_residual: np.ndarray
    iterations: np.ndarray
    rank_deficient: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.names)


@dataclasses.dataclass(frozen=True)
class BoostReport:
    """Which solver boosted each matrix group, whether it converged, which matrices are rank-deficient."""

    groups: tuple[GroupReport, ...]
    rank_rtol: float | None = None

    @property
    def rank_deficient(self) -> tuple[str, ...]:
        """Names of the matrices whose numerical rank is below ``min(m, n)``."""
        return tuple(
            name for g in self.groups if g.rank_deficient is not None
            for name, flag in zip(g.names, g.rank_deficient) if flag
        )

    @property
    def ambiguous(self) -> tuple[str, ...]:
        """Rank-deficient matrices whose result depends on the SVD's null-space basis.

        All rank-deficient ones when ``rank_rtol`` is ``None``; none otherwise
        (their null space is kept at zero).
        """
        return self.rank_deficient if self.rank_rtol is None else ()

    def rank_warning(self, limit: int = 5) -> str | None:
        """One line naming the `ambiguous` matrices (``None`` if there are none)."""
        names = self.ambiguous
        if not names:
            return None
        shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
        return (f"warning: {len(names)} rank-deficient matrices ({shown}): their boosted null space depends "
                f"on the SVD's choice of basis; set rank_rtol (e.g. 1e-5) to keep it at zero.")

    @property
    def fallbacks(self) -> dict[str, str]:
        """``{matrix name: reason}`` for every matrix recomputed by exact SVD."""
        return {
            name: reason
            for g in self.groups
            for name, fell, reason in zip(g.names, g.fallback, g.reasons)
            if fell
        }

    @property
    def solvers(self) -> dict[tuple[int, int], str]:
        """``{shape: solver}`` per group."""
        return {g.shape: g.solver for g in self.groups}

    def summary(self) -> str:
        """One line per group: shape, solver, matrices, fallbacks, worst residuals, k range."""
        lines = [f"{'shape':>12} {'dtype':>8} {'solver':>6} {'count':>5} {'fallback':>8} "
                 f"{'k min-max':>9} {'polar res':>9} {'trip res':>9} {'iters':>5}"]
        for g in self.groups:
            finite = lambda a: a[np.isfinite(a)]  # noqa: E731
            pr, tr = finite(g.polar_residual), finite(g.triplet_residual)
            lines.append(
                f"{g.shape[0]:>5} x {g.shape[1]:<5}{g.dtype:>8} {g.solver:>6} {g.count:>5} "
                f"{int(g.fallback.sum()):>8} {f'{g.k.min()}-{g.k.max()}':>9} "
                f"{(f'{pr.max():.1e}' if pr.size else '-'):>9} {(f'{tr.max():.1e}' if tr.size else '-'):>9} "
                f"{int(g.iterations.max()):>5}"
            )
        for name, reason in self.fallbacks.items():
            lines.append(f"  fell back to SVD: {name}: {reason}")
        for name in self.rank_deficient:
            lines.append(f"  rank-deficient: {name}" + ("" if self.rank_rtol is None
                                                          else f" (null space kept at zero, rank_rtol={self.rank_rtol})"))
        return "\n".join(lines)

    __str__ = summary


def group_names(plan) -> dict[tuple[int, int, str], list[str]]:
    names: dict[tuple[int, int, str], list[str]] = {g: [] for g in plan.groups}
    for member in plan.members:
        if member.count == 1:
            names[member.group].append(member.name)
        else:
            names[member.group].extend(f"{member.name}[{i}]" for i in range(member.count))
    return names


def report(keys, names, solvers, infos, rank_rtol: float | None = None) -> BoostReport:
    """A `BoostReport` from per-group keys, matrix names, solvers and (device) infos."""
    infos = jax.device_get(infos)
    groups = []
    for (m, n, dtype), group_names, solver, info in zip(keys, names, solvers, infos):
        groups.append(GroupReport(
            shape=(m, n), dtype=dtype, solver=solver, names=tuple(group_names),
            k=np.asarray(info["k"]), fallback=np.asarray(info["fallback"]),
            reasons=tuple(polar_boost.REASONS[int(r)] for r in np.asarray(info["reason"])),
            polar_residual=np.asarray(info["polar_residual"]),
            triplet_residual=np.asarray(info["triplet_residual"]),
            iterations=np.asarray(info["iterations"]),
            rank_deficient=np.asarray(info["rank_deficient"]),
        ))
    return BoostReport(tuple(groups), rank_rtol=rank_rtol)


def check_solver_arguments(solver: str, tol: float | None) -> None:
    if solver not in SOLVERS:
        raise SubboostError(f"subspace_boost: solver must be one of {SOLVERS}, got {solver!r}.")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise SubboostError(f"subspace_boost: tol must be None or in (0, 1), got {tol!r}.")


def check_rank_arguments(attn_beta: float | None, rank_rtol: float | None) -> None:
    if attn_beta is not None:
        check_real("attn_beta", attn_beta, what="subspace_boost", low=0.0, high=1.0)
    if rank_rtol is not None:
        check_real("rank_rtol", rank_rtol, what="subspace_boost", low=0.0, high=1.0, low_open=True, high_open=True)


def prepare_boost_input(tau: PyTree, *, beta: float | None, attn_beta: float | None, rank_rtol: float | None,
                        attention: AttentionMode, is_matrix: Callable | None, batch_size: int | None, solver: str,
                        tol: float | None, validate: bool, mesh, what: str) -> tuple[PyTree, bool, dict]:
    """The checks and normalisation shared by `subspace_boost` and `subspace_boost_sweep`.

    Returns ``(tau, is_array, options)``: the (placed) input, whether it is a bare array, and the
    normalised ``is_matrix``, ``attention``, ``attn_beta`` (``None`` when equal to ``beta``; ``beta=None``:
    a sweep, where ``attn_beta`` is kept as given), ``tol`` and ``rank_rtol``.
    """
    check_solver_arguments(solver, tol)
    check_rank_arguments(attn_beta, rank_rtol)
    tol = None if tol is None else float(tol)
    same = attn_beta is None or beta is not None and float(attn_beta) == float(beta)
    attn_beta = None if same else float(attn_beta)
    rank_rtol = None if rank_rtol is None else float(rank_rtol)
    if batch_size is not None:
        check_int("batch_size", batch_size, what=what, low=1)
    is_array = isinstance(tau, jax.Array) or hasattr(tau, "__array__") and not isinstance(tau, dict)
    if validate and not is_array and not matrix_plan(tau, is_matrix=is_matrix, attention=attention).members:
        # boosting would silently change nothing (e.g. scan-stacked kernels under the default predicate)
        raise SubboostError(no_matrices_message(tau, what=what, is_matrix=is_matrix))
    if is_array:
        tau = jnp.asarray(tau)
        if tau.ndim < 2:
            raise SubboostError(f"{what}: a bare array needs >= 2 dimensions, got shape {tau.shape}.")
        is_matrix, attention, attn_beta = _array_predicate, "per_qkv", None
    if validate:
        if not is_array:
            check_floating(tau, what=f"{what} input")
        check_finite(tau, what=f"{what} input")
    if mesh is not None:
        mesh_axes(mesh)
        tau = place_parameters(tau, mesh)
    return tau, is_array, {"is_matrix": is_matrix, "attention": attention, "attn_beta": attn_beta, "tol": tol,
                           "rank_rtol": rank_rtol}


def subspace_boost(
    tau: PyTree,
    *,
    beta: float = 0.01,
    attn_beta: float | None = None,
    rank_rtol: float | None = None,
    mode: BoostMode = "cumsum",
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
    solver: Solver = "svd",
    tol: float | None = None,
    return_info: bool = False,
    validate: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> PyTree | tuple[PyTree, BoostReport]:
    """Subspace Boosting of a merged task vector (every matrix leaf).

    Args:
      tau: merged task vector (a parameter pytree), or a bare array whose two
        trailing axes form the matrices.
      beta: cutoff in [0, 1] (the paper's grid: `subboost.grids.PAPER_BETAS`).
      attn_beta: cutoff of the attention q/k/v matrices (as formed by
        ``attention``); ``None`` = ``beta``. The authors' code uses 0.10.
      rank_rtol: singular values ``<= rank_rtol * s_0`` count as exact zeros
        and stay zero, so rank-deficient matrices get a defined result (the
        same on any device count and from both solvers). ``None`` (default):
        the authors' behaviour, every singular value raised.
      mode: ``"cumsum"`` (default) or ``"index"``; see the module docstring.
      attention: how attention kernels form matrices: ``per_qkv`` (default),
        ``full`` (q/k/v stacked, PyTorch's ``in_proj_weight``) or ``per_head``.
      is_matrix: predicate ``(path, leaf) -> MatrixLayout | bool | None``
        overriding `subboost.tree.default_is_matrix`.
      batch_size: boost at most this many matrices of a group at once
        (`jax.lax.map`), bounding SVD temporaries; ``None`` = whole groups.
      solver: ``"svd"`` (default: one exact SVD per matrix), ``"polar"``
        (``s_k P + sum_{i<k} (s_i - s_k) u_i v_i^T`` from a QDWH polar factor
        and the top triplets, `subboost.polar_boost`; matrices it does not
        converge on are recomputed by SVD) or ``"auto"`` (per group, see
        `choose_solver`).
      tol: the polar solver's accepted ``||P^T P - I||_F / sqrt(n)``
        (default ``1e-4`` in float32, ``1e-10`` in float64).
      return_info: also return a `BoostReport` (solver per group; per matrix
        ``k``, fallback and residuals). Costs one host transfer of small arrays.
      validate: check for non-finite values first (one host sync), and that
        at least one leaf is a matrix (else boosting would change nothing).
      mesh: run over this device mesh: every matrix group is split along its
        group axis over the devices (`subboost.sharding`); result replicated.

    Returns:
      The boosted task vector, same structure, shapes and dtypes; with
      ``return_info``, ``(boosted, report)``.

    Example:
      >>> import jax.numpy as jnp
      >>> out = subspace_boost(jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0])), beta=0.5)
      >>> [round(float(v), 4) for v in jnp.linalg.svd(out, compute_uv=False)]
      [4.0, 4.0, 4.0, 4.0]
    """
    check_boost_arguments(beta, mode)
    tau, is_array, options = prepare_boost_input(
        tau, beta=beta, attn_beta=attn_beta, rank_rtol=rank_rtol, attention=attention, is_matrix=is_matrix,
        batch_size=batch_size, solver=solver, tol=tol, validate=validate, mesh=mesh, what="subspace_boost")
    is_matrix, attention, attn_beta = options["is_matrix"], options["attention"], options["attn_beta"]
    tol, rank_rtol = options["tol"], options["rank_rtol"]
    program = (_boost_tree_traced_beta if beta_can_be_traced(tau, mode=mode, solver=solver, attn_beta=attn_beta)
               else _boost_tree)
    out = program(
        tau, beta=float(beta), mode=mode, attention=attention, is_matrix=is_matrix, batch_size=batch_size,
        solver=solver, tol=tol, with_info=return_info, attn_beta=attn_beta, rank_rtol=rank_rtol, mesh=mesh,
    )
    if not return_info:
        return out
    if is_array:
        (m, n), count = tau.shape[-2:], math.prod(tau.shape[:-2])
        names = [[f"[{i}]" for i in range(count)]] if tau.ndim > 2 else [["matrix"]]
        keys = [(m, n, jnp.dtype(tau.dtype).name)]
        return out[0], report(keys, names, [choose_solver(solver, (m, n), beta=float(beta), mode=mode)], out[1], rank_rtol)
    plan = matrix_plan(tau, is_matrix=is_matrix, attention=attention)
    return out[0], tree_report(plan, solver, float(beta), attn_beta, mode, out[1], rank_rtol)


def tree_report(plan, solver: str, beta: float, attn_beta: float | None, mode: BoostMode, infos,
                rank_rtol: float | None) -> BoostReport:
    """The `BoostReport` of a boosted tree (groups in plan order)."""
    names = group_names(plan)
    masks = attention_matrices(plan)
    attn_beta = beta if attn_beta is None else attn_beta
    solvers = [choose_solver(solver, g[:2], beta=group_beta(masks[g], beta, attn_beta), mode=mode) for g in plan.groups]
    return report(plan.groups, [names[g] for g in plan.groups], solvers, infos, rank_rtol)


# ----------------------------------------------------------------------------
# Many betas from one SVD per matrix
# ----------------------------------------------------------------------------
def sweep_group(x: jax.Array, *, betas: tuple[float, ...], mode: BoostMode, solver: Solver, tol: float | None,
                rank_rtol: float | None) -> jax.Array:
    """A group ``(G, m, n)`` boosted at every beta: ``(G, B, m, n)``.

    Boosting keeps the singular vectors, so where every beta gets the exact SVD (`choose_solver`) one
    ``U, s, V^T`` serves them all; otherwise each beta runs `boost_group` with its solver.
    """
    solvers = [choose_solver(solver, x.shape[-2:], beta=b, mode=mode) for b in betas]
    if all(chosen == "svd" for chosen in solvers):
        u, s, vh = linalg.svd(x)
        out = [linalg.reconstruct(u, boosted_spectrum(s, beta=b, mode=mode, rank_rtol=rank_rtol)[0], vh).astype(x.dtype)
               for b in betas]
    else:
        out = [boost_group(x, beta=b, mode=mode, solver=chosen, tol=tol, rank_rtol=rank_rtol)[0]
               for b, chosen in zip(betas, solvers)]
    return jnp.stack(out, axis=1)


def _sweep_tree_impl(tau: PyTree, *, betas: tuple[float, ...], mode: BoostMode, attention: AttentionMode,
                     is_matrix: Callable | None, batch_size: int | None, solver: Solver, tol: float | None,
                     attn_beta: float | None, rank_rtol: float | None, mesh: jax.sharding.Mesh | None):
    """``tau`` boosted at every beta; every leaf gains a leading beta axis (non-matrix leaves broadcast)."""
    plan = matrix_plan(tau, is_matrix=is_matrix, attention=attention)
    masks = attention_matrices(plan)
    kernel = functools.partial(sweep_group, mode=mode, solver=solver, tol=tol, rank_rtol=rank_rtol)

    def attention_kernel(x):  # one cutoff for every beta: boosted once, repeated along the beta axis
        one = kernel(x, betas=(attn_beta,))
        return jnp.broadcast_to(one, (one.shape[0], len(betas)) + one.shape[2:])

    def parts(group):
        is_attention = masks[group]
        if attn_beta is None or not is_attention.any():
            return [(None, functools.partial(kernel, betas=betas))]
        if is_attention.all():
            return [(None, attention_kernel)]
        return [(np.flatnonzero(is_attention), attention_kernel),
                (np.flatnonzero(~is_attention), functools.partial(kernel, betas=betas))]

    mapped = plan.map_groups(None, tau, batch_size=batch_size, mesh=mesh, parts=parts)
    leaves = jax.tree_util.tree_leaves(tau)
    boosted = plan.scatter(mapped)  # leaf id -> (B, *leaf shape)
    others = {i: jnp.broadcast_to(leaf, (len(betas),) + jnp.shape(leaf)) for i, leaf in enumerate(leaves)
              if i not in boosted}
    out = plan.rebuild(tau, {**others, **boosted})
    if mesh is not None:
        out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))
    return out


_sweep_tree = size_aware_jit(_sweep_tree_impl, static_argnames=("betas",) + tuple(
    name for name in _BOOST_STATIC if name != "with_info"))


def subspace_boost_sweep(
    tau: PyTree,
    *,
    betas: Sequence[float],
    attn_beta: float | None = None,
    rank_rtol: float | None = None,
    mode: BoostMode = "cumsum",
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
    solver: Solver = "svd",
    tol: float | None = None,
    validate: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> list[PyTree]:
    """`subspace_boost` at every beta of ``betas``, from one SVD per matrix.

    Boosting keeps the singular vectors and changes only the spectrum,
    ``s'_i = max(s_i, s_k(beta))``, so one ``tau = U diag(s) V^T`` per matrix
    serves every beta (with ``solver="svd"``; another solver, or ``"auto"``
    choosing one, boosts each beta on its own inside the same compiled call).

    Args:
      tau: merged task vector (a parameter pytree) or a bare array, as for `subspace_boost`.
      betas: the cutoffs, each in [0, 1] (e.g. the paper's grid, `subboost.grids.PAPER_BETAS`).
      attn_beta: cutoff of the attention q/k/v matrices for every beta; ``None``: each beta's own.
      rank_rtol, mode, attention, is_matrix, batch_size, solver, tol, validate, mesh: as in `subspace_boost`.

    Returns:
      One boosted tree per beta, in the order of ``betas``; tree ``i`` equals
      ``subspace_boost(tau, beta=betas[i], ...)`` with the same keywords.

    Example:
      >>> import jax.numpy as jnp
      >>> outs = subspace_boost_sweep(jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0])), betas=(0.5, 1.0))
      >>> [[round(float(v), 4) for v in jnp.linalg.svd(o, compute_uv=False)] for o in outs]
      [[4.0, 4.0, 4.0, 4.0], [4.0, 2.0, 1.0, 0.0]]
    """
    if isinstance(betas, (int, float)) or not isinstance(betas, Sequence) or not betas:
        raise SubboostError(f"subspace_boost_sweep: betas must be a non-empty sequence of numbers, got {betas!r}.")
    for beta in betas:
        check_boost_arguments(beta, mode)
    tau, is_array, options = prepare_boost_input(
        tau, beta=None, attn_beta=attn_beta, rank_rtol=rank_rtol, attention=attention, is_matrix=is_matrix,
        batch_size=batch_size, solver=solver, tol=tol, validate=validate, mesh=mesh, what="subspace_boost_sweep")
    betas = tuple(float(b) for b in betas)
    out = _sweep_tree(tau, betas=betas, mode=mode, solver=solver, batch_size=batch_size, mesh=mesh, **options)
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], out) for i in range(len(betas))]


def equivalent_betas(cutoffs: Mapping[float, np.ndarray]) -> dict[float, list[float]]:
    """Groups betas whose cutoff indices agree on every matrix: they give the same boosted tree.

    Args:
      cutoffs: ``{beta: k of every matrix}`` (e.g. from `cutoff_index` on the spectra), in grid order.

    Returns:
      ``{first beta of a group: every beta of the group}``, first betas in grid order; boosting only
      the keys and evaluating them once serves the whole grid.
    """
    groups: dict[float, list[float]] = {}
    for beta, ks in cutoffs.items():
        twin = next((b for b in groups if np.array_equal(cutoffs[b], ks)), None)
        groups.setdefault(beta if twin is None else twin, []).append(beta)
    return groups
