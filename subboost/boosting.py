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
Boosting commutes with positive scaling, ``boost(a tau) = a boost(tau)``, so one
boost serves a whole sweep over the merging coefficient ``alpha``.

Non-matrix leaves (biases, norms, embeddings, the final projection) pass
through unchanged. All matrices of equal shape are boosted by one batched,
jit-compiled SVD.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.task_vectors import SubboostError, check_finite, check_floating
from subboost.tree import AttentionMode, PyTree, map_matrices

BoostMode = Literal["cumsum", "index"]
BOOST_MODES = ("cumsum", "index")


def cutoff_index(s: jax.Array, beta: float, mode: BoostMode = "cumsum") -> jax.Array:
    """Index ``k`` of the cutoff singular value, per matrix (``s``: ``(..., r)``, descending).

    ``cumsum``: the first ``i`` with ``sum(s[:i+1]) / sum(s) >= beta``.
    ``index``: ``floor(beta * r)``. Both are clamped to ``r - 1``.
    """
    r = s.shape[-1]
    if mode == "index":
        return jnp.full(s.shape[:-1], min(int(beta * r), r - 1), jnp.int32)
    total = jnp.sum(s, axis=-1, keepdims=True)
    fraction = jnp.cumsum(s, axis=-1) / jnp.where(total > 0, total, 1)
    # The cumulative fraction is non-decreasing, so the first index reaching
    # beta equals the number of entries still below it.
    k = jnp.sum(fraction < beta, axis=-1).astype(jnp.int32)
    return jnp.minimum(k, r - 1)


def boost_singular_values(s: jax.Array, beta: float, mode: BoostMode = "cumsum") -> jax.Array:
    """``s'_i = max(s_i, s_k)`` with ``k = cutoff_index(s, beta, mode)``."""
    k = cutoff_index(s, beta, mode)
    s_k = jnp.take_along_axis(s, k[..., None], axis=-1)
    return jnp.maximum(s, s_k)


def boost_matrices(x: jax.Array, beta: float, mode: BoostMode = "cumsum") -> jax.Array:
    """Boosts a stack of matrices ``(..., m, n)``; same shape and dtype out."""
    u, s, vh = linalg.svd(x)
    return linalg.reconstruct(u, boost_singular_values(s, beta, mode), vh).astype(x.dtype)


def check_boost_arguments(beta: float, mode: str) -> None:
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise SubboostError(f"subspace_boost: beta must be in [0, 1], got {beta!r}.")
    if mode not in BOOST_MODES:
        raise SubboostError(f"subspace_boost: mode must be one of {BOOST_MODES}, got {mode!r}.")


@functools.partial(jax.jit, static_argnames=("beta", "mode", "attention", "is_matrix", "batch_size"))
def _boost_tree(
    tau: PyTree,
    *,
    beta: float,
    mode: BoostMode,
    attention: AttentionMode,
    is_matrix: Callable | None,
    batch_size: int | None,
) -> PyTree:
    return map_matrices(
        lambda x: boost_matrices(x, beta, mode),
        tau,
        attention=attention,
        is_matrix=is_matrix,
        batch_size=batch_size,
    )


def subspace_boost(
    tau: PyTree,
    beta: float = 0.01,
    *,
    mode: BoostMode = "cumsum",
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
    validate: bool = True,
) -> PyTree:
    """Subspace Boosting of a merged task vector (every matrix leaf).

    Args:
      tau: merged task vector (a parameter pytree), or a bare array whose two
        trailing axes form the matrices.
      beta: cutoff in [0, 1] (paper grid {0.0, 0.01, 0.02}).
      mode: ``"cumsum"`` (default) or ``"index"``; see the module docstring.
      attention: how attention kernels form matrices: ``per_qkv`` (default),
        ``full`` (q/k/v stacked, PyTorch's ``in_proj_weight``) or ``per_head``.
      is_matrix: predicate ``(path, leaf) -> MatrixLayout | bool | None``
        overriding `subboost.tree.default_is_matrix`.
      batch_size: boost at most this many matrices of a group at once
        (`jax.lax.map`), bounding SVD temporaries; ``None`` = whole groups.
      validate: check for non-finite values first (one host sync).

    Returns:
      The boosted task vector, same structure, shapes and dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> out = subspace_boost(jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0])), beta=0.5)
      >>> [round(float(v), 4) for v in jnp.linalg.svd(out, compute_uv=False)]
      [4.0, 4.0, 4.0, 4.0]
    """
    check_boost_arguments(beta, mode)
    if isinstance(tau, (jax.Array,)) or hasattr(tau, "__array__") and not isinstance(tau, dict):
        x = jnp.asarray(tau)
        if x.ndim < 2:
            raise SubboostError(f"subspace_boost: a bare array needs >= 2 dimensions, got shape {x.shape}.")
        if validate:
            check_finite(x, what="subspace_boost input")
        return _boost_array(x, beta=float(beta), mode=mode)
    if validate:
        check_floating(tau, what="subspace_boost input")
        check_finite(tau, what="subspace_boost input")
    return _boost_tree(
        tau, beta=float(beta), mode=mode, attention=attention, is_matrix=is_matrix, batch_size=batch_size
    )


@functools.partial(jax.jit, static_argnames=("beta", "mode"))
def _boost_array(x: jax.Array, *, beta: float, mode: BoostMode) -> jax.Array:
    return boost_matrices(x, beta, mode)
