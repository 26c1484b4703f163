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


# Up to this many experts the ordered sum is unrolled (one fused loop); beyond, a `fori_loop` keeps the
# program small. Both add the rows in the same order, so they give the same bits.
UNROLL_MAX_EXPERTS = 64


def ordered_sum(x: jax.Array) -> jax.Array:
    """``((x_0 + x_1) + x_2) + ...`` over the leading axis, in that order, in ``x``'s dtype.

    XLA's reductions choose their own association, and it changes with the
    axis length; adding the experts in order instead makes the sum independent
    of trailing zero task vectors (exact padding, `subboost.merging.padding`)
    and the same on every backend (each step is one IEEE addition).
    """
    num_tasks = x.shape[0]
    if num_tasks <= UNROLL_MAX_EXPERTS:
        total = x[0]
        for t in range(1, num_tasks):
            total = total + x[t]
        return total
    return jax.lax.fori_loop(1, num_tasks, lambda t, total: total + x[t], x[0])


def expert_sum(x: jax.Array) -> jax.Array:
    """Sum over the leading expert axis, in expert order (`ordered_sum`), accumulated in at least float32."""
    return ordered_sum(x.astype(compute_dtype(x.dtype))).astype(x.dtype)


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
