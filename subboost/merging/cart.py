"""CART: Centred Arithmetic with Rank-reduced Task vectors (Choi et al., 2024, arXiv 2412.12153).

Weight averaging is task arithmetic around the experts' mean. CART keeps that
centre and adds back a low-rank part of each expert's offset from it; per
weight matrix (``s = min(m, n)``, T stacked task vectors)::

    mean   = (1/T) sum_t tau_t
    k      = max(1, round(rank_fraction * s))
    tau    = mean + lambda * sum_t SVD_k(tau_t - mean)

where ``SVD_k`` keeps the top ``k`` singular triplets and ``lambda`` is
``centred_scale``. In parameters: ``theta = theta_avg + lambda sum_t
SVD_k(theta_t - theta_avg)`` (the paper's equation), i.e. ``theta_0 + tau``:
apply with ``alpha = 1``. ``k = s`` gives weight averaging (the centred task
vectors sum to zero), ``k = 0`` too. Non-matrix leaves get the mean.

The paper has no released reference code that was available here; this is
its definition. The paper finds a rank near 8% of the full rank best (the
default ``rank_fraction``); ``lambda`` is tuned there on validation data
(default 1.0 here, with the alpha sweep scaling the whole result).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.merging.tsv import merge_task_matrices
from subboost.tree import AttentionMode, PyTree
from subboost.validation import check_real


def cart_rank(m: int, n: int, rank_fraction: float) -> int:
    """``k = max(1, round(rank_fraction * min(m, n)))`` (Python's rounding, half to even)."""
    return max(1, round(rank_fraction * min(m, n)))


def cart_matrices(x: jax.Array, *, rank_fraction: float = 0.08, centred_scale: float = 1.0) -> jax.Array:
    """CART of stacked per-task matrices ``(..., T, m, n)`` -> ``(..., m, n)``, dtype kept."""
    xc = x.astype(linalg.compute_dtype(x.dtype))
    m, n = xc.shape[-2:]
    rank = cart_rank(m, n, rank_fraction)
    mean = jnp.mean(xc, axis=-3)
    u, s, vh = linalg.svd(xc - mean[..., None, :, :])
    low_rank = linalg.reconstruct(u[..., :rank], s[..., :rank], vh[..., :rank, :])
    return (mean + centred_scale * jnp.sum(low_rank, axis=-3)).astype(x.dtype)


def check_cart(rank_fraction: float, centred_scale: float, what: str = "cart") -> None:
    check_real("rank_fraction", rank_fraction, what=what, low=0.0, high=1.0, low_open=True)
    check_real("centred_scale", centred_scale, what=what)


def cart(
    tvs: PyTree,
    *,
    rank_fraction: float = 0.08,
    centred_scale: float = 1.0,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """CART merge: the experts' mean plus ``centred_scale`` times the rank-k parts of their offsets from it.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      rank_fraction: ``k / min(m, n)`` in (0, 1] (paper: about 0.08); at least one direction is kept.
      centred_scale: the paper's ``lambda``, the weight of the low-rank centred task vectors.
      attention: ``per_qkv`` (default), ``full`` or ``per_head``.
      is_matrix: predicate overriding `subboost.tree.default_is_matrix`.
      batch_size: merge at most this many same-shaped matrices at once; ``None`` = whole groups.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert).

    Example:
      >>> import jax.numpy as jnp
      >>> tvs = {"dense": {"kernel": jnp.stack([jnp.diag(jnp.array([4.0, 0.0])),
      ...                                       jnp.diag(jnp.array([0.0, 2.0]))])}}
      >>> cart(tvs, rank_fraction=0.5)["dense"]["kernel"]  # mean diag(2, 1); rank-1 offsets diag(2, 0), diag(-2, 0)
      Array([[2., 0.],
             [0., 1.]], dtype=float32)
    """
    check_cart(rank_fraction, centred_scale)
    kernel = lambda x: cart_matrices(x, rank_fraction=rank_fraction, centred_scale=centred_scale)  # noqa: E731
    return merge_task_matrices(kernel, tvs, what="cart", attention=attention, is_matrix=is_matrix,
                               batch_size=batch_size)
