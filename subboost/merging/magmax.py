"""MagMax: per entry, the task vector of largest magnitude (Marczak et al., ECCV 2024, arXiv 2407.06322).

For T stacked task vectors and every parameter entry j::

    t*(j) = the last t with |tau_t[j]| = max_s |tau_s[j]|
    tau[j] = tau_{t*(j)}[j]

applied as ``theta = theta_0 + alpha * tau`` (the reference's
``scaling_factor``, 0.5 for independently fine-tuned experts).

Conventions of FusionBench 0.2.33 (``fusion_bench/method/magmax/magmax.py``),
matched here: ties go to the *later* task (its running fold replaces the
selection when ``|new| >= |current|``); every floating-point parameter is
merged, biases and norms included. The selection is elementwise, so the
result at a parameter depends on that parameter alone (streamable chunk by
chunk) and appending zero task vectors changes nothing (a zero wins a tie
only against a zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subboost.tree import PyTree


def magmax_leaf(x: jax.Array) -> jax.Array:
    """MagMax over the leading expert axis of one leaf ``(T, ...)``, dtype kept."""
    num_tasks = x.shape[0]
    # argmax returns the first maximum; on the reversed axis that is the last task.
    last = num_tasks - 1 - jnp.argmax(jnp.abs(x[::-1]), axis=0)
    return jnp.take_along_axis(x, last[None], axis=0)[0]


def magmax(tvs: PyTree) -> PyTree:
    """MagMax merge: per entry, the value of the task vector with the largest magnitude.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert).

    Example:
      >>> import jax.numpy as jnp
      >>> magmax({"w": jnp.array([[1.0, -3.0, 2.0], [-2.0, 1.0, 2.0]])})["w"]
      Array([-2., -3.,  2.], dtype=float32)
    """
    return jax.tree_util.tree_map(magmax_leaf, tvs)
