"""Spectral diagnostics of weight matrices: spectra, stable rank, energy rank.

Rank collapse shows as a spectrum concentrated in few directions:

    stable rank  = sum_i s_i^2 / s_0^2
    energy rank  = min{ k : sum_{i<k} s_i^2 >= e * sum_i s_i^2 }   (e = 0.95)

A pytree input gives ``{module path: value}`` for every matrix leaf (e.g.
``"transformer/resblocks_3/attn/query"``), computed with one batched SVD per
group of same-shaped matrices. A bare array is read as a matrix (or a stack of
matrices on its trailing two axes). Zero matrices have stable rank 0 and energy
rank 0, never NaN; a matrix holding NaN or inf is an error (its SVD is
meaningless), and a tree without a single matrix leaf gives a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.compilation import size_aware_jit
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite
from subboost.tree import AttentionMode, PyTree, matrix_plan
from subboost.validation import check_real, no_matrices_message


def warn_no_matrices(tree: PyTree, *, what: str, is_matrix: Callable | None, lead_ndim: int = 0) -> None:
    """A scan-stacked tree under the default predicate has no matrix leaf: say so, not ``{}``."""
    message = no_matrices_message(tree, what=what, is_matrix=is_matrix, lead_ndim=lead_ndim)
    warnings.warn(message, UserWarning, stacklevel=3)


def _relative(s: jax.Array) -> jax.Array:
    """``s / s_0`` (zeros for a zero matrix): the ratios the ranks need, free of overflow."""
    s0 = s[..., :1]
    return jnp.where(s0 > 0, s / jnp.where(s0 > 0, s0, 1), 0.0)


def stable_rank_from_singular_values(s: jax.Array) -> jax.Array:
    """``sum s^2 / s_0^2 = sum (s / s_0)^2`` (0 for a zero matrix).

    Computed on ``s / s_0`` so that entries around 1e25, whose squares overflow
    float32, still give the right value.
    """
    r = _relative(s)
    return jnp.sum(r * r, axis=-1)


def energy_rank_from_singular_values(s: jax.Array, *, fraction: float = 0.95) -> jax.Array:
    """Smallest ``k`` with ``sum_{i<k} s_i^2 >= fraction * sum s_i^2`` (on ``s / s_0``: no overflow)."""
    r = _relative(s)
    energy = r * r
    total = jnp.sum(energy, axis=-1, keepdims=True)
    cumulative = jnp.cumsum(energy, axis=-1)
    # Entries still below the target are exactly the ones before index k-1.
    below = jnp.sum(cumulative < fraction * total, axis=-1)
    return jnp.where(total[..., 0] > 0, jnp.minimum(below + 1, s.shape[-1]), 0).astype(jnp.int32)


@size_aware_jit(static_argnames=("lead_ndim", "is_matrix", "attention"))
def _tree_spectra(tree, *, lead_ndim, is_matrix, attention) -> dict[str, jax.Array]:
    plan = matrix_plan(tree, lead_ndim=lead_ndim, is_matrix=is_matrix, attention=attention)
    return plan.split(plan.map_groups(linalg.singular_values, tree))


def spectra(
    x: PyTree,
    *,
    lead_ndim: int = 0,
    is_matrix: Callable | None = None,
    attention: AttentionMode = "per_qkv",
) -> jax.Array | dict[str, jax.Array]:
    """Singular values (descending) of every matrix.

    Args:
      x: a parameter pytree, or an array whose trailing two axes are matrices.
      lead_ndim: leading axes every leaf carries (1 for stacked task vectors);
        they appear before the singular-value axis of the result.
      is_matrix: matrix predicate (default `subboost.tree.default_is_matrix`).
      attention: ``per_qkv``, ``full`` or ``per_head`` attention matrices.

    Returns:
      An array for an array input, else ``{module path: singular values}``;
      members holding several matrices (scan-stacked layers, heads) carry a
      leading axis over them.
    """
    if isinstance(x, jax.Array) or (hasattr(x, "__array__") and not isinstance(x, dict)):
        x = jnp.asarray(x)
        if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
            raise SubboostError("spectra: the matrix contains NaN or infinite values (its SVD would be meaningless).")
        return linalg.singular_values(x)
    check_finite(x, what="spectra input")
    plan = matrix_plan(x, lead_ndim=lead_ndim, is_matrix=is_matrix, attention=attention)
    if not plan.members:
        warn_no_matrices(x, what="spectra", is_matrix=is_matrix, lead_ndim=lead_ndim)
    return _tree_spectra(x, lead_ndim=lead_ndim, is_matrix=is_matrix, attention=attention)


def _apply(metric: Callable[[jax.Array], jax.Array], values):
    if isinstance(values, dict):
        return {name: metric(s) for name, s in values.items()}
    return metric(values)


def stable_rank(x: PyTree, **kwargs) -> jax.Array | dict[str, jax.Array]:
    """Stable rank ``sum_i s_i^2 / s_0^2`` per matrix (see `spectra` for arguments).

    Example:
      >>> import jax.numpy as jnp
      >>> float(stable_rank(jnp.diag(jnp.array([2.0, 1.0, 1.0]))))
      1.5
    """
    return _apply(stable_rank_from_singular_values, spectra(x, **kwargs))


def energy_rank(x: PyTree, *, fraction: float = 0.95, **kwargs) -> jax.Array | dict[str, jax.Array]:
    """Number of singular directions holding ``fraction`` of the energy ``sum s^2``.

    Raises:
      SubboostError: ``fraction`` is not a number in ``(0, 1]``.
    """
    fraction = check_real("fraction", fraction, what="energy_rank", low=0.0, high=1.0, low_open=True)
    return _apply(lambda s: energy_rank_from_singular_values(s, fraction=fraction), spectra(x, **kwargs))
