"""Model Stock: the experts' mean pulled towards the base by their angle (Jang et al., ECCV 2024, arXiv 2403.19522).

Per parameter tensor (every leaf: matrices, biases and norms alike), with T
stacked task vectors and ``eps = 1e-8``::

    cos_ij  = <tau_i, tau_j> / (||tau_i|| ||tau_j|| + eps)     clipped to [-1, 1]
    angle   = mean over pairs i < j of arccos(cos_ij)
    t       = T cos(angle) / ((T - 1) cos(angle) + 1 + eps)
    tau     = t * (1/T) sum_t tau_t

so ``theta_0 + tau = t * mean(theta_t) + (1 - t) * theta_0``, the reference's
model (apply it with ``alpha = 1``; the alpha sweep of the benchmarks scales
it further).

Conventions of FusionBench 0.2.33 (``fusion_bench/method/model_stock/model_stock.py``),
matched here: the pairwise *angles* (not the cosines) are averaged before the
cosine is taken back; ``eps`` is added to the product of the norms and to the
ratio's denominator; the cosine is computed in float32 (here: at least float32);
no parameter is ignored (the reference's ``ignore_keys`` is empty by default).
Difference: ``cos(mean arccos c_ij)`` is evaluated as the equal
``sin(mean arcsin c_ij)``, which float32 keeps accurate for nearly
orthogonal experts (``t`` near 0, the usual case).
Model Stock needs at least two experts. The ratio of a parameter depends on
that parameter alone (streamable), but zero task vectors change the angle
and ``T``: the task axis is never padded.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from subboost.linalg import compute_dtype
from subboost.errors import SubboostError
from subboost.tree import PyTree

EPS = 1e-8


def model_stock_ratio(x: jax.Array) -> jax.Array:
    """The interpolation ratio ``t`` of one leaf's stacked task vectors ``(T, ...)`` (a scalar)."""
    num_tasks = x.shape[0]
    flat = x.reshape(num_tasks, -1).astype(compute_dtype(x.dtype))
    gram = flat @ flat.T
    norms = jnp.sqrt(jnp.diagonal(gram))
    i, j = (jnp.asarray(a) for a in zip(*itertools.combinations(range(num_tasks), 2)))
    cosines = jnp.clip(gram[i, j] / (norms[i] * norms[j] + EPS), -1.0, 1.0)
    # cos(mean_ij arccos c_ij) = sin(mean_ij arcsin c_ij): the same number, but accurate to a few ulps of t
    # when the experts are nearly orthogonal (t near 0), where the arccos form loses ~1e-5 of t in float32.
    cos_angle = jnp.sin(jnp.mean(jnp.arcsin(cosines)))
    return num_tasks * cos_angle / ((num_tasks - 1) * cos_angle + 1 + EPS)


def model_stock_leaf(x: jax.Array) -> jax.Array:
    """Model Stock of one leaf ``(T, ...)`` -> ``(...)``, dtype kept."""
    mean = jnp.mean(x.astype(compute_dtype(x.dtype)), axis=0)
    return (model_stock_ratio(x) * mean).astype(x.dtype)


def model_stock(tvs: PyTree) -> PyTree:
    """Model Stock merge: each parameter's expert mean scaled by the angle-derived ratio ``t``.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf, ``T >= 2``.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert),
      to be applied with ``alpha = 1`` for the reference's model.

    Raises:
      SubboostError: fewer than two experts.

    Example:
      >>> import jax.numpy as jnp
      >>> tvs = {"w": jnp.array([[2.0, 0.0], [2.0, 0.0]])}  # parallel experts: t = 1, the mean
      >>> model_stock(tvs)["w"]
      Array([2., 0.], dtype=float32)
    """
    leaves = jax.tree_util.tree_leaves(tvs)
    if leaves and leaves[0].shape[0] < 2:
        raise SubboostError(f"model_stock: needs at least 2 experts, got {leaves[0].shape[0]}.")
    return jax.tree_util.tree_map(model_stock_leaf, tvs)
