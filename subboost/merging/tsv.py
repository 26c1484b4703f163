"""TSV-M: merging by Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per weight matrix, in PyTorch orientation ``(out, in) = (m, n)`` with
``s = min(m, n)``, and T stacked task vectors::

    tau_t  = U_t diag(S_t) V_t^T                  thin SVD, S_t descending
    r      = floor(s / T)                         triplets kept per task
    U_hat  = [U_1[:, :r] .. U_T[:, :r]]            (m, T r)
    S_hat  = [S_1[:r]    .. S_T[:r]]               (T r,)
    V_hat  = [V_1[:, :r] .. V_T[:, :r]]            (n, T r)
    U_perp = polar(U_hat),  V_perp = polar(V_hat)  (P Q^T of X = P Sigma Q^T)
    tau    = U_perp diag(S_hat) V_perp^T

The polar factor is the orthonormal matrix closest to ``U_hat`` in Frobenius
norm, so the kept task subspaces are decorrelated with as little change as
possible. Non-matrix leaves (biases, norms, embeddings, the final projection)
are averaged over tasks. TSV-M does not depend on orientation
(``tsv(tau^T) = tsv(tau)^T``), but it is computed on ``(out, in)`` matrices like
every SVD-based method here.

All matrices of one shape are merged by one batched, jit-compiled call: the
per-task SVDs run batched over layers and tasks together (``(G, T, m, n)``).
With ``batch_size`` no group is gathered into one array (that alone would copy
all the task vectors): `subboost.tree.MatrixPlan.map_groups` loads
``batch_size`` layers' matrices at a time straight from their leaves, so the temporaries stay at that many layers'
worth (T matrices each plus SVD workspace) whatever the depth. On T = 20
ViT-L/14 MLP layers (1024 x 4096), XLA's temporaries are 1.45 GiB for all 24
blocks with ``batch_size=1`` (15 GiB of task vectors), against 26 GiB when
groups are gathered (``experiments/bench_svd_memory.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.merging.averaging import expert_mean
from subboost.errors import SubboostError
from subboost.tree import AttentionMode, PyTree, map_matrices, matrix_plan
from subboost.validation import check_int


def concatenate_task_triplets(
    u: jax.Array, s: jax.Array, vh: jax.Array, rank: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keeps each task's top ``rank`` triplets and concatenates them task after task.

    Args:
      u, s, vh: per-task thin SVDs, ``(..., T, m, k)``, ``(..., T, k)``, ``(..., T, k, n)``.
      rank: triplets kept per task (``<= k``).

    Returns:
      ``U_hat (..., m, T rank)``, ``S_hat (..., T rank)``, ``Vh_hat (..., T rank, n)``;
      column/entry/row ``t * rank + j`` is task t's j-th triplet.
    """
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    num_tasks, m = u.shape[-3], u.shape[-2]
    lead = u.shape[:-3]
    u_hat = jnp.swapaxes(u, -3, -2).reshape(lead + (m, num_tasks * rank))
    s_hat = s.reshape(lead + (num_tasks * rank,))
    vh_hat = vh.reshape(lead + (num_tasks * rank, vh.shape[-1]))
    return u_hat, s_hat, vh_hat


def orthogonalise(
    u_hat: jax.Array, s_hat: jax.Array, vh_hat: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(polar(U_hat), S_hat, polar(Vh_hat))``: the concatenated bases made orthonormal."""
    u_perp = linalg.polar(u_hat)
    return u_perp, s_hat, linalg.polar(linalg.after(vh_hat, u_perp))  # one LAPACK call at a time


def tsv_rank(m: int, n: int, num_tasks: int) -> int:
    """``r = floor(min(m, n) / T)``, the triplets TSV-M keeps per task."""
    return min(m, n) // num_tasks


def tsv_factors(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U_perp, S_hat, V_perp^T)`` for stacks of per-task matrices ``(..., T, m, n)``.

    ``U_perp`` is ``(..., m, T r)`` with orthonormal columns, ``V_perp^T`` is
    ``(..., T r, n)`` with orthonormal rows, ``S_hat`` is ``(..., T r)`` (task
    after task, each block descending); all in the compute dtype (>= float32).
    """
    num_tasks, m, n = x.shape[-3:]
    rank = tsv_rank(m, n, num_tasks)
    if rank == 0:
        raise SubboostError(
            f"tsv: a {m}x{n} matrix has min(m, n) = {min(m, n)} < T = {num_tasks} tasks, "
            "so no singular triplet per task can be kept."
        )
    return orthogonalise(*concatenate_task_triplets(*linalg.svd(x), rank))


def tsv_matrices(x: jax.Array) -> jax.Array:
    """TSV-M of stacked per-task matrices ``(..., T, m, n)`` -> ``(..., m, n)``, dtype kept."""
    return linalg.reconstruct(*tsv_factors(x)).astype(x.dtype)


def merge_task_matrices(
    kernel: Callable[[jax.Array], jax.Array],
    tvs: PyTree,
    *,
    what: str,
    attention: AttentionMode,
    is_matrix: Callable | None,
    batch_size: int | None,
    rule: Callable[[int, int, int], str | None] | None = None,
) -> PyTree:
    """``kernel`` on every matrix group ``(G, T, m, n)`` of stacked task vectors, the mean over tasks elsewhere.

    The shared body of the SVD merges (TSV-M, Iso-C, Iso-CTS). Checks
    ``batch_size``, then every matrix against ``rule(m, n, T)`` (``None`` when an
    ``m x n`` matrix suits T tasks, else the reason), raising `SubboostError`
    for the first one it objects to, naming its parameter path and shape.
    """
    check_batch_size(batch_size, what)
    if rule is not None:
        num_tasks = jax.tree_util.tree_leaves(tvs)[0].shape[0]
        plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=attention)
        for member in plan.members:
            m, n, _ = member.group
            reason = rule(m, n, num_tasks)
            if reason is not None:
                path = plan.paths[member.leaf_ids[0]]
                raise SubboostError(
                    f"{what}: parameter {path!r} (shape {member.leaf_shape}, read as {m}x{n} "
                    f"(out, in) matrices with attention={member.attention!r}) {reason} "
                    f"for T = {num_tasks} tasks."
                )
    return map_matrices(kernel, tvs, non_matrix=expert_mean, lead_ndim=1, is_matrix=is_matrix,
                        attention=attention, batch_size=batch_size)


def _tsv_size_problem(m: int, n: int, num_tasks: int) -> str | None:
    if tsv_rank(m, n, num_tasks) > 0:
        return None
    return f"has min(m, n) = {min(m, n)}: too few rows/columns for floor(min(m, n) / T) >= 1"


def check_batch_size(batch_size: int | None, what: str) -> None:
    """``batch_size`` is ``None`` or a positive integer (`subboost.validation.check_int`)."""
    if batch_size is not None:
        check_int("batch_size", batch_size, what=what, low=1)


def tsv(
    tvs: PyTree,
    *,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """TSV-M merge of stacked task vectors (leading expert axis T).

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      attention: how attention kernels form matrices: ``per_qkv`` (default),
        ``full`` (q/k/v stacked, PyTorch's ``in_proj_weight``, as the reference
        code sees CLIP) or ``per_head``.
      is_matrix: predicate ``(path, leaf) -> MatrixLayout | bool | None``
        overriding `subboost.tree.default_is_matrix`.
      batch_size: merge at most this many same-shaped matrices at once
        (`jax.lax.map`, loading them straight from their leaves), bounding the
        temporaries to ``batch_size`` layers' worth (all T tasks each) instead
        of a copy of all task vectors; ``None`` = whole groups at once (fastest).

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert).

    Raises:
      SubboostError: a matrix has ``min(m, n) < T`` (no triplet per task), naming it.

    Example:
      >>> import jax.numpy as jnp
      >>> tvs = {"dense": {"kernel": jnp.stack([jnp.diag(jnp.array([3.0, 1.0])),
      ...                                       jnp.array([[0.0, 0.0], [0.0, 2.0]])])}}
      >>> tsv(tvs)["dense"]["kernel"]  # task 0 keeps e_0 (3), task 1 keeps e_1 (2)
      Array([[3., 0.],
             [0., 2.]], dtype=float32)
    """
    return merge_task_matrices(tsv_matrices, tvs, what="tsv", rule=_tsv_size_problem, attention=attention,
                               is_matrix=is_matrix, batch_size=batch_size)
