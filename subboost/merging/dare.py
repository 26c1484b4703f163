"""DARE: drop and rescale, then a base merge (Yu et al., 2024, arXiv 2311.03099).

Each entry of each task vector is dropped with probability ``p`` and the
survivors are rescaled by ``1 / (1 - p)`` so the expectation is unchanged:
``tau_t' = m_t * tau_t / (1 - p)``, ``m_t ~ Bernoulli(1 - p)``; then Task
Arithmetic or TIES merges the sparsified vectors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from subboost.merging.averaging import task_arithmetic
from subboost.merging.flat import flat_merge
from subboost.merging.ties import ties
from subboost.tree import PyTree
from subboost.validation import check_choice

# The merges DARE (and Consensus) can be applied to.
BASE_MERGES = {"task_arithmetic": task_arithmetic, "ties": ties}
BASES: tuple[str, ...] = tuple(BASE_MERGES)


def keep_mask(key: jax.Array, *, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``m ~ Bernoulli(1 - p)`` of one leaf's shape: True where the entry survives."""
    return jax.random.bernoulli(key, 1.0 - p, shape)


def drop(x: jax.Array, keep: jax.Array, *, p: float) -> jax.Array:
    """``keep * x / (1 - p)`` in ``x``'s dtype: DARE on one leaf, given its keep mask."""
    return jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros_like(x)).astype(x.dtype)


def drop_and_rescale(tvs: PyTree, *, key: jax.Array, p: float) -> PyTree:
    """Drops each entry with probability ``p`` and rescales survivors by ``1/(1-p)``.

    Leaf ``i`` (in tree-flatten order) draws its mask from ``split(key, num_leaves)[i]``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    keys = jax.random.split(key, len(leaves))
    out = [drop(x, keep, p=p) for x, keep in zip(leaves, keep_masks(keys, [x.shape for x in leaves], 1.0 - p))]
    return jax.tree_util.tree_unflatten(treedef, out)


def keep_masks(keys: jax.Array, shapes: list[tuple[int, ...]], keep_probability: float) -> list[jax.Array]:
    """``[bernoulli(keys[i], keep_probability, shapes[i]) for i]``, one vmapped draw per distinct shape.

    The same masks as the per-leaf loop, bit for bit (a vmapped threefry draw is
    the per-key draw), but the program holds one random generator per shape
    instead of one per leaf: a transformer's many same-shaped layers compile once.
    """
    if _one_draw_applies(keys, shapes):
        return _keep_masks_one_draw(keys, shapes, keep_probability)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    masks: list[jax.Array | None] = [None] * len(shapes)
    for shape, members in groups.items():
        draw = jax.vmap(lambda k, shape=shape: jax.random.bernoulli(k, keep_probability, shape))
        drawn = draw(keys[jnp.asarray(members)]) if len(members) > 1 else draw(keys[members[0]][None])
        for j, i in enumerate(members):
            masks[i] = drawn[j]
    return masks


def dare(
    tvs: PyTree,
    *,
    key: jax.Array,
    p: float = 0.9,
    base: str = "task_arithmetic",
    **base_kwargs: Any,
) -> PyTree:
    """DARE sparsification followed by ``base`` (``task_arithmetic`` or ``ties``).

    Args:
      tvs: stacked task vectors.
      key: a `jax.random` key; DARE is random and never picks one for you.
      p: drop probability in [0, 1).
      base: the merge applied to the sparsified task vectors.
      **base_kwargs: hyper-parameters of ``base`` (e.g. ``k`` for TIES).
    """
    check_choice("base", base, BASES, what="dare")
    return BASE_MERGES[base](drop_and_rescale(tvs, key=key, p=p), **base_kwargs)


def dare_flat(
    tvs: PyTree,
    *,
    key: jax.Array,
    p: float = 0.9,
    base: str = "task_arithmetic",
    **base_kwargs: Any,
) -> PyTree:
    """`dare` with its base merge run on the leaves concatenated into one ``(T, N)`` leaf.

    The masks are drawn per leaf exactly as in `dare` (they are its random
    stream); only the base merge runs flat (`subboost.merging.flat.flat_merge`),
    so the result is `dare`'s bit for bit, from a smaller program.
    """
    check_choice("base", base, BASES, what="dare")
    return flat_merge(BASE_MERGES[base], drop_and_rescale(tvs, key=key, p=p), **base_kwargs)


# At most this many entries in all are drawn by `_keep_masks_one_draw` (it holds four uint32 arrays of them).
ONE_DRAW_MAX_ENTRIES = 1 << 25


def _one_draw_applies(keys: jax.Array, shapes: list[tuple[int, ...]]) -> bool:
    import math

    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(keys)) if typed else jax.config.jax_default_prng_impl
    sizes = [math.prod(shape) for shape in shapes]
    return (impl == "threefry2x32" and jax.config.jax_threefry_partitionable and not jax.config.jax_enable_x64
            and len(shapes) > 1 and sum(sizes) <= ONE_DRAW_MAX_ENTRIES and max(sizes) < 2**32)


def _keep_masks_one_draw(keys: jax.Array, shapes: list[tuple[int, ...]], keep_probability: float) -> list[jax.Array]:
    """`keep_masks` as one threefry hash over every entry of every leaf (float32, partitionable threefry).

    ``bernoulli(key, q, shape)`` is ``uniform(key, shape) < q``; its uniform comes
    from ``threefry2x32(key, i)`` of each entry's row-major index ``i`` (high and
    low 32-bit words), the two output words xor-ed, the top 23 bits made a float in
    [1, 2), minus 1. Hashing every leaf's (key, index) pairs in one call gives the
    same bits as one call per leaf; `tests/test_compilation.py` checks it bit for bit.
    """
    import math

    from jax.extend.random import threefry2x32_p

    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(keys) if typed else keys
    sizes = [math.prod(shape) for shape in shapes]
    key_hi = jnp.concatenate([jnp.broadcast_to(data[i, 0], (n,)) for i, n in enumerate(sizes)])
    key_lo = jnp.concatenate([jnp.broadcast_to(data[i, 1], (n,)) for i, n in enumerate(sizes)])
    index_lo = jnp.concatenate([jnp.arange(n, dtype=jnp.uint32) for n in sizes])
    bits_hi, bits_lo = threefry2x32_p.bind(key_hi, key_lo, jnp.zeros_like(index_lo), index_lo)
    mantissa = jax.lax.shift_right_logical(bits_hi ^ bits_lo, jnp.uint32(32 - 23)) | jnp.uint32(0x3F800000)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    keep = uniform < jnp.float32(keep_probability)
    masks, offset = [], 0
    for shape, n in zip(shapes, sizes):
        masks.append(keep[offset:offset + n].reshape(shape))
        offset += n
    return masks
