"""STAR: Spectral Truncation And Rescale (Lee et al., NAACL 2025, arXiv 2502.10339).

Per weight matrix of each task vector (PyTorch orientation; STAR is
orientation-free), with singular values ``s_1 >= ... >= s_R``::

    r      = min { k : s_1 + ... + s_k >= f (s_1 + ... + s_R) }     f = nuclear_fraction
    tau_t' = (sum_i s_i / sum_{i<=r} s_i) * sum_{i<=r} s_i u_i v_i^T

keeping the fewest top directions that carry a fraction ``f`` of the nuclear
norm, rescaled so the nuclear norm is unchanged; the STAR merge is the plain
average ``tau = (1/T) sum_t tau_t'``. Non-matrix leaves are averaged too.

Conventions of the authors' code (``IBM/STAR``, ``merger/STAR.py``), matched
here: the paper's ``eta`` is a percentage (default 40), here
``nuclear_fraction = eta / 100`` (default 0.4); ``r`` is found by a
left-sided search of the cumulative sum (the first ``k`` reaching the
target, so ties keep the smaller rank); the merge averages (1/T), so
``alpha = 1`` reproduces it. A zero matrix stays zero (the reference divides
0 by 0 there).

`star_truncate_matrices` is the same truncation on any stack of matrices:
`subboost.post_merge.star` applies it to a merged task vector.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.tree import AttentionMode, PyTree
from subboost.merging.tsv import merge_task_matrices
from subboost.validation import check_real


def check_nuclear_fraction(fraction: float, what: str = "star") -> float:
    return check_real("nuclear_fraction", fraction, what=what, low=0.0, high=1.0, low_open=True)


def star_truncate_matrices(x: jax.Array, *, nuclear_fraction: float = 0.4) -> jax.Array:
    """STAR's truncate-and-rescale of every matrix of a stack ``(..., m, n)``, dtype kept."""
    u, s, vh = linalg.svd(x.astype(linalg.compute_dtype(x.dtype)))
    total = jnp.sum(s, axis=-1, keepdims=True)
    cumulative = jnp.cumsum(s, axis=-1)
    # rank r: 1 + the number of k whose cumulative sum is still below the target.
    rank = 1 + jnp.sum(cumulative < nuclear_fraction * total, axis=-1, keepdims=True)
    keep = jnp.arange(s.shape[-1]) < rank
    kept = jnp.where(keep, s, 0.0)
    kept_sum = jnp.sum(kept, axis=-1, keepdims=True)
    scaled = kept * jnp.where(kept_sum > 0, total / jnp.where(kept_sum > 0, kept_sum, 1.0), 0.0)
    return linalg.reconstruct(u, scaled, vh).astype(x.dtype)


def star(
    tvs: PyTree,
    *,
    nuclear_fraction: float = 0.4,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """STAR merge: each task matrix truncated to a share of its nuclear norm and rescaled, then averaged.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      nuclear_fraction: f in (0, 1], the share of each matrix's nuclear norm
        its kept directions must reach (the paper's ``eta / 100``; 0.4).
      attention: ``per_qkv`` (default), ``full`` or ``per_head``.
      is_matrix: predicate overriding `subboost.tree.default_is_matrix`.
      batch_size: merge at most this many same-shaped matrices at once; ``None`` = whole groups.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert).

    Example:
      >>> import jax.numpy as jnp
      >>> tvs = {"dense": {"kernel": jnp.stack([jnp.diag(jnp.array([3.0, 1.0]))] * 2)}}
      >>> star(tvs, nuclear_fraction=0.5)["dense"]["kernel"]  # keeps s_1 = 3, rescaled to 4
      Array([[4., 0.],
             [0., 0.]], dtype=float32)
    """
    check_nuclear_fraction(nuclear_fraction)

    def kernel(x: jax.Array) -> jax.Array:  # (G, T, m, n) -> (G, m, n)
        truncated = star_truncate_matrices(x, nuclear_fraction=nuclear_fraction)
        return jnp.mean(truncated.astype(linalg.compute_dtype(x.dtype)), axis=-3).astype(x.dtype)

    return merge_task_matrices(kernel, tvs, what="star", attention=attention, is_matrix=is_matrix,
                               batch_size=batch_size)
