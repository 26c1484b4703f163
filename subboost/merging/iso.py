"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959).

Per weight matrix in PyTorch orientation ``(out, in) = (m, n)``, ``s = min(m, n)``,
T stacked task vectors and ``tau_TA = sum_t tau_t = U diag(sigma) V^T``:

**Iso-C** flattens the spectrum of the sum::

    tau = mean(sigma) * U V^T

**Iso-CTS** (common space fraction f, default 0.8) keeps the top directions of
the sum as a common subspace and fills the rest with task-specific ones::

    c   = int(s f);  c = s - round((s - c) / T) * T    (so s - c splits evenly)
    p   = (s - c) / T                                   task-specific triplets per task
    common: U_c, sigma_c, V_c = top-c triplets of SVD(tau_TA)
    per task: tau_t' = tau_t - U_c U_c^T tau_t          (remove the common LEFT subspace)
              top-p triplets of SVD(tau_t')
    U_hat = [U_1'[:, :p] .. U_T'[:, :p], U_c]   (m, s);  V_hat likewise;  S_hat = all s values
    tau = mean(S_hat) * polar(U_hat) polar(V_hat)^T

Removing the *left* subspace makes Iso-CTS orientation-dependent: it acts on
``(out, in)`` matrices (a Flax kernel's transpose) so results equal the
reference PyTorch implementation's. ``round`` is Python's (half to even), as in
the reference code. Non-matrix leaves are averaged over tasks.

Every matrix group is merged by one batched, jit-compiled call; the per-task
SVDs of Iso-CTS run batched over layers and tasks together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.merging.tsv import concatenate_task_triplets, merge_task_matrices, orthogonalise
from subboost.errors import SubboostError
from subboost.tree import AttentionMode, PyTree
from subboost.validation import check_real


def _flat_spectrum_product(u: jax.Array, s: jax.Array, vh: jax.Array) -> jax.Array:
    """``mean(s) * U Vh`` for stacks."""
    return jnp.mean(s, axis=-1)[..., None, None] * (u @ vh)


def iso_c_matrices(x: jax.Array) -> jax.Array:
    """Iso-C of stacked per-task matrices ``(..., T, m, n)`` -> ``(..., m, n)``, dtype kept."""
    total = jnp.sum(x.astype(linalg.compute_dtype(x.dtype)), axis=-3)
    return _flat_spectrum_product(*linalg.svd(total)).astype(x.dtype)


def check_common_space_fraction(fraction: float, what: str = "iso_cts") -> None:
    check_real("common_space_fraction", fraction, what=what, low=0.0, high=1.0, low_open=True)


def iso_cts_sizes(m: int, n: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(c, p)``: common-space size and task-specific triplets per task (``c + T p = s``).

    ``c`` may come out negative (or ``p`` zero for ``f < 1``) when the matrix is
    too small for T tasks; `iso_cts` rejects those cases.
    """
    s = min(m, n)
    common = int(s * common_space_fraction)
    common = s - round((s - common) / num_tasks) * num_tasks
    return common, (s - common) // num_tasks


def _iso_cts_size_problem(m: int, n: int, num_tasks: int, fraction: float) -> str | None:
    common, per_task = iso_cts_sizes(m, n, num_tasks, fraction)
    s = min(m, n)
    if common < 0:
        return (
            f"has min(m, n) = {s}: the task-specific space round((s - int(s*f))/T)*T = {s - common} "
            f"exceeds s (common_space_fraction={fraction}); too few rows/columns"
        )
    if per_task == 0 and fraction < 1.0:
        return (
            f"has min(m, n) = {s}: round((s - int(s*f))/T) = 0 task-specific directions per task "
            f"(common_space_fraction={fraction}); too few rows/columns -- lower "
            "common_space_fraction, or use iso_c"
        )
    return None


def iso_cts_factors(x: jax.Array, *, common_space_fraction: float = 0.8) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(polar(U_hat), S_hat, polar(V_hat)^T)`` of Iso-CTS for ``(..., T, m, n)`` stacks.

    ``S_hat`` holds the ``s`` singular values before flattening (task blocks,
    then the common block); all outputs in the compute dtype.
    """
    num_tasks, m, n = x.shape[-3:]
    common, per_task = iso_cts_sizes(m, n, num_tasks, common_space_fraction)
    if common < 0:
        raise SubboostError(f"iso_cts: a {m}x{n} matrix is too small for T = {num_tasks} tasks.")
    xc = x.astype(linalg.compute_dtype(x.dtype))
    u, s, vh = linalg.svd(jnp.sum(xc, axis=-3))
    u_c, s_c, vh_c = u[..., :common], s[..., :common], vh[..., :common, :]
    if per_task == 0:  # f = 1: the common space is everything (Iso-C)
        return orthogonalise(u_c, s_c, vh_c)
    # Remove the common left subspace from every task: tau_t - U_c (U_c^T tau_t).
    residual = xc - u_c[..., None, :, :] @ (jnp.swapaxes(u_c, -1, -2)[..., None, :, :] @ xc)
    u_t, s_t, vh_t = concatenate_task_triplets(*linalg.svd(residual), per_task)
    u_hat = jnp.concatenate([u_t, u_c], axis=-1)
    s_hat = jnp.concatenate([s_t, s_c], axis=-1)
    vh_hat = jnp.concatenate([vh_t, vh_c], axis=-2)
    return orthogonalise(u_hat, s_hat, vh_hat)


def iso_cts_matrices(x: jax.Array, *, common_space_fraction: float = 0.8) -> jax.Array:
    """Iso-CTS of stacked per-task matrices ``(..., T, m, n)`` -> ``(..., m, n)``, dtype kept."""
    return _flat_spectrum_product(*iso_cts_factors(x, common_space_fraction=common_space_fraction)).astype(x.dtype)


def iso_c(
    tvs: PyTree,
    *,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """Iso-C merge of stacked task vectors: every matrix of the sum gets a flat spectrum.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      attention: ``per_qkv`` (default), ``full`` (q/k/v stacked, PyTorch's
        ``in_proj_weight``) or ``per_head``.
      is_matrix: predicate overriding `subboost.tree.default_is_matrix`.
      batch_size: merge at most this many same-shaped matrices at once
        (`jax.lax.map`, loading them straight from their leaves; see
        `subboost.tree.MatrixPlan.map_groups`); ``None`` = whole groups.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert).

    Example:
      >>> import jax.numpy as jnp
      >>> tvs = {"dense": {"kernel": jnp.stack([jnp.diag(jnp.array([3.0, 0.0])),
      ...                                       jnp.diag(jnp.array([0.0, 1.0]))])}}
      >>> iso_c(tvs)["dense"]["kernel"]  # spectrum (3, 1) of the sum -> (2, 2)
      Array([[2., 0.],
             [0., 2.]], dtype=float32)
    """
    return merge_task_matrices(iso_c_matrices, tvs, what="iso_c", attention=attention, is_matrix=is_matrix,
                               batch_size=batch_size)


def iso_cts(
    tvs: PyTree,
    *,
    common_space_fraction: float = 0.8,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """Iso-CTS merge of stacked task vectors: common plus task-specific subspaces, flat spectrum.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      common_space_fraction: f in (0, 1], the share of the ``min(m, n)``
        directions taken from the sum's top subspace (before rounding so the
        rest splits evenly over tasks). ``f = 1`` is Iso-C.
      attention: ``per_qkv`` (default), ``full`` (q/k/v stacked, PyTorch's
        ``in_proj_weight``) or ``per_head``.
      is_matrix: predicate overriding `subboost.tree.default_is_matrix`.
      batch_size: merge at most this many same-shaped matrices at once
        (`jax.lax.map`, loading them straight from their leaves), bounding the
        per-task SVD temporaries to that many layers' worth; ``None`` = whole groups.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert).

    Raises:
      SubboostError: ``common_space_fraction`` outside (0, 1]; a matrix too
        small to give every task at least one direction (for ``f < 1``), naming
        its parameter path and shape.
    """
    check_common_space_fraction(common_space_fraction)
    return merge_task_matrices(
        functools.partial(iso_cts_matrices, common_space_fraction=common_space_fraction),
        tvs,
        what="iso_cts",
        rule=functools.partial(_iso_cts_size_problem, fraction=common_space_fraction),
        attention=attention,
        is_matrix=is_matrix,
        batch_size=batch_size,
    )
