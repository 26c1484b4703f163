"""Batched dense kernels on ``(..., m, n)`` stacks: SVD, polar factor, QR.

All functions act on the two trailing axes and batch over every other axis, so
one call handles a whole matrix group of `subboost.tree`. Inputs in a
low-precision float type (bfloat16, float16) are computed in float32 and the
result is cast back: dtype in equals dtype out.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from subboost.errors import SubboostError

SvdMethod = Literal["auto", "direct", "qr"]
# Backends on which `svd(method="auto")` reduces tall/wide matrices by a thin QR
# first. Empty: on CPU, LAPACK's gesdd already QR-reduces tall input itself and
# experiments/bench_boost.py measured mixed results (0.88x-1.42x over four ViT
# MLP shapes, two matrices each, one run); GPU is unmeasured so far (the bench's
# tall-SVD table is the place to decide it).
TALL_QR_BACKENDS: frozenset[str] = frozenset()
# Aspect ratio max(m, n) / min(m, n) from which "auto" uses the QR route.
TALL_QR_RATIO = 2.0


def compute_dtype(dtype) -> jnp.dtype:
    """At least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def use_tall_qr(shape: tuple[int, ...], backend: str | None = None) -> bool:
    """Whether ``svd(method="auto")`` takes the QR route for matrices of ``shape``."""
    m, n = shape[-2:]
    backend = jax.default_backend() if backend is None else backend
    return backend in TALL_QR_BACKENDS and max(m, n) >= TALL_QR_RATIO * min(m, n)


def rank_tolerance(shape: tuple[int, int], dtype, rank_rtol: float | None) -> float:
    """Relative tolerance below which a singular value counts as zero.

    ``rank_rtol`` if given, else numpy's ``matrix_rank`` default ``max(m, n) * eps``.
    """
    if rank_rtol is not None:
        return float(rank_rtol)
    return max(shape) * float(jnp.finfo(compute_dtype(dtype)).eps)


def after(x: jax.Array, previous) -> jax.Array:
    """``x`` (same values, ``-0.0`` aside) made data-dependent on ``previous`` (a pytree or None).

    Why: jaxlib 0.10's batched CPU LAPACK kernels (QR, SVD, eigh, LU, ...) hand
    chunks of their batch to XLA's intra-op thread pool and block a pool thread
    until those finish. XLA runs independent operations of one program side by
    side; when as many such kernels run at once as the pool has threads (2 on a
    2-core machine), each waits for work queued behind the others and the
    process hangs. Every function here that decomposes several groups (or
    several independent stacks) in one jit chains them with ``after``, so at
    most one LAPACK call is in flight. On GPU/TPU the chain costs nothing
    measurable: kernels of one program run in order there anyway.
    """
    if previous is None:
        return x
    leaves = jax.tree_util.tree_leaves(previous)
    if not leaves:
        return x
    # One element of every leaf (each may come from a different LAPACK call).
    probes = [jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in leaves if jnp.size(leaf)]
    if not probes:
        return x
    probe = jnp.stack(probes)
    zero = jnp.sum(jnp.where(jnp.isfinite(probe), probe, 0) * 0)  # where(): p * 0 is NaN for NaN or inf p
    return x + zero.astype(x.dtype)


def svd(x: jax.Array, *, method: SvdMethod = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``x = U diag(s) Vh`` in at least float32, ``s`` descending.

    ``method="qr"`` factors a tall ``x = Q R`` (a wide one through ``x^T``)
    and takes the SVD of the square ``R = U_R diag(s) Vh``: ``U = Q U_R``.
    Same result up to rounding (and the usual sign freedom); it pays where the
    backend's SVD of the square ``R`` is much cheaper than of ``x`` (e.g. a
    Jacobi SVD limited to small matrices). ``"auto"`` uses it per
    `use_tall_qr`; ``"direct"`` never.

    Returns:
      ``(U, s, Vh)`` in the compute dtype: shapes ``(..., m, r)``, ``(..., r)``,
      ``(..., r, n)`` with ``r = min(m, n)``.
    """
    if method not in ("auto", "direct", "qr"):
        raise SubboostError(f"svd: method must be 'auto', 'direct' or 'qr', got {method!r}.")
    x = x.astype(compute_dtype(x.dtype))
    m, n = x.shape[-2:]
    if method == "auto":
        method = "qr" if use_tall_qr(x.shape) else "direct"
    if method == "direct" or m == n:
        return jnp.linalg.svd(x, full_matrices=False)
    wide = m < n
    a = jnp.swapaxes(x, -1, -2) if wide else x
    q, r = jnp.linalg.qr(a, mode="reduced")
    u_r, s, vh = jnp.linalg.svd(r, full_matrices=False)
    u = q @ u_r
    if wide:  # x^T = U s Vh  =>  x = Vh^T s U^T
        return jnp.swapaxes(vh, -1, -2), s, jnp.swapaxes(u, -1, -2)
    return u, s, vh


def singular_values(x: jax.Array) -> jax.Array:
    """Singular values ``(..., min(m, n))``, descending, in the compute dtype."""
    return jnp.linalg.svd(x.astype(compute_dtype(x.dtype)), compute_uv=False)


def reconstruct(u: jax.Array, s: jax.Array, vh: jax.Array) -> jax.Array:
    """``U diag(s) Vh`` for stacks."""
    return jnp.einsum("...ik,...k,...kj->...ij", u, s, vh)


def polar(x: jax.Array) -> jax.Array:
    """Orthogonal polar factor ``P = U Vh`` of ``x = U diag(s) Vh`` (via SVD).

    For a matrix with orthonormal-izable columns (``m >= n``) ``P`` has
    orthonormal columns; for ``m < n`` orthonormal rows. This is the
    orthogonalisation TSV-M and Iso-CTS apply to their concatenated bases.
    """
    u, _, vh = svd(x)
    return u @ vh


def top_k_svd(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The leading ``k`` singular triplets of every matrix in the stack."""
    u, s, vh = svd(x)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR in at least float32."""
    return jnp.linalg.qr(x.astype(compute_dtype(x.dtype)), mode="reduced")
