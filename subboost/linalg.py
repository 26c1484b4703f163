"""Batched dense kernels on ``(..., m, n)`` stacks: SVD, polar factor, QR.

All functions act on the two trailing axes and batch over every other axis, so
one call handles a whole matrix group of `subboost.tree`. Inputs in a
low-precision float type (bfloat16, float16) are computed in float32 and the
result is cast back: dtype in equals dtype out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """At least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``x = U diag(s) Vh`` in at least float32, ``s`` descending.

    Returns:
      ``(U, s, Vh)`` in the compute dtype: shapes ``(..., m, r)``, ``(..., r)``,
      ``(..., r, n)`` with ``r = min(m, n)``.
    """
    x = x.astype(compute_dtype(x.dtype))
    return jnp.linalg.svd(x, full_matrices=False)


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
