"""Weight averaging and Task Arithmetic: the linear merges.

Weight averaging  ``tau = (1/T) sum_t tau_t``;
Task Arithmetic   ``tau = sum_t tau_t`` (Ilharco et al., 2023, arXiv 2212.04089),
applied as ``theta = theta_0 + alpha * tau``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subboost.linalg import compute_dtype
from subboost.tree import PyTree


def expert_sum(x: jax.Array) -> jax.Array:
    """Sum over the leading expert axis, accumulated in at least float32."""
    return jnp.sum(x.astype(compute_dtype(x.dtype)), axis=0).astype(x.dtype)


def expert_mean(x: jax.Array) -> jax.Array:
    """Mean over the leading expert axis, accumulated in at least float32."""
    return jnp.mean(x.astype(compute_dtype(x.dtype)), axis=0).astype(x.dtype)


def weight_averaging(tvs: PyTree) -> PyTree:
    """``tau = (1/T) sum_t tau_t`` for stacked task vectors ``tvs`` (leading axis T)."""
    return jax.tree_util.tree_map(expert_mean, tvs)


def task_arithmetic(tvs: PyTree) -> PyTree:
    """``tau = sum_t tau_t`` (Task Arithmetic, arXiv 2212.04089).

    Example:
      >>> import jax.numpy as jnp
      >>> task_arithmetic({"w": jnp.array([[1.0, 2.0], [3.0, -1.0]])})["w"]
      Array([4., 1.], dtype=float32)
    """
    return jax.tree_util.tree_map(expert_sum, tvs)
