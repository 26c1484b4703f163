"""Flat programs: a merge of the tree's leaves concatenated into one ``(T, N)`` leaf.

An elementwise merge of a tree with ``L`` leaves traces ``L`` copies of its
arithmetic, and XLA's compile time grows with the program. `flat_merge` runs the
method once on the concatenation and slices the result back into the tree. A
method's record (`subboost.merging.registry.MergeMethod`) says whether, with given
hyper-parameters, this is exact (``flattens``) and which function runs flat
(``flat_fn``); `can_flatten` adds the conditions on the tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from subboost.tree import PyTree

# An elementwise merge of a tree with L leaves traces L copies of its arithmetic,
# and XLA's compile time grows with the program. TIES is the heavy one: its
# threshold bisection counts every leaf in each of its 32 steps. On the tiny
# benchmark model (40 leaves, T = 4) TIES compiled 13x faster on one (T, N) leaf;
# the concatenation and the 40 slices back cost about 2 s of compilation
# themselves, more than Task Arithmetic's or Consensus-TA's whole per-leaf program,
# so only the methods that run TIES are flattened. The merge of the concatenated
# leaves, split back, *is* the merge of the tree, entry for entry: every step is
# elementwise over parameters, sums over the expert axis, or (TIES's global
# threshold, its sign vote) an exact integer count over all parameters. The
# concatenation is a copy of the task vectors, so trees above `FLATTEN_MAX_BYTES`
# keep the per-leaf program (their compile time is paid back by their run time).
FLATTEN_MAX_BYTES = 1 << 26  # 64 MiB of stacked task vectors: where compile time, not run time, dominates


def fits_flat(tvs: PyTree) -> bool:
    """Whether the leaves of ``tvs`` can be concatenated cheaply: at least two arrays with one dtype and one
    expert count, ``FLATTEN_MAX_BYTES`` at most in all."""
    leaves = jax.tree_util.tree_leaves(tvs)
    if len(leaves) < 2 or any(getattr(x, "ndim", 0) < 1 for x in leaves):
        return False
    if len({x.dtype for x in leaves}) != 1 or len({x.shape[0] for x in leaves}) != 1:
        return False
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves) <= FLATTEN_MAX_BYTES


def can_flatten(method: Any, tvs: PyTree, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``method.flat_fn(tvs, **kwargs)`` gives exactly ``method.fn(tvs, **kwargs)`` and is worth it.

    ``method`` is a `MergeMethod` record.
    """
    return method.flattens is not None and method.flattens(kwargs) and fits_flat(tvs)


def flat_merge(fn: Callable[..., PyTree], tvs: PyTree, **kwargs: Any) -> PyTree:
    """``fn`` applied to the leaves of ``tvs`` concatenated into one ``(T, N)`` leaf, split back into the tree.

    Traced inside the caller's `jax.jit`: the program holds the method's
    arithmetic once, plus one concatenation and one slice per leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    num_tasks = leaves[0].shape[0]
    flat = jnp.concatenate([x.reshape(num_tasks, -1) for x in leaves], axis=1)
    merged = fn({"flat": flat}, **kwargs)["flat"]
    out, offset = [], 0
    for x in leaves:
        size = math.prod(x.shape[1:])
        out.append(merged[offset:offset + size].reshape(x.shape[1:]))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["FLATTEN_MAX_BYTES", "can_flatten", "fits_flat", "flat_merge"]
