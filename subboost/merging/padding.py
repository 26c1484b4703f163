"""Padding the task axis: one compiled merge for many numbers of experts.

`jax.jit` compiles a program per input shape, so every new number of experts
``T`` compiled each merge again. For the methods on which zero task vectors are
exact padding, `subboost.merge` appends zero task vectors up to the next
multiple of `TASK_BUCKET` first, so ``T = 1 .. 16`` share one program, ``17 .. 32``
the next, and so on:

* Task Arithmetic: ``sum_t tau_t``, added in expert order
  (`subboost.merging.averaging.ordered_sum`), so trailing zero rows add exactly
  nothing (XLA's own reductions re-associate with the axis length);
* TIES: a zero row is kept by its own trim (threshold 0) but never agrees with
  an elected sign (``x > 0`` / ``x < 0``), so it enters neither the disjoint sum
  nor its count, and it adds nothing to the sign vote; the real rows' thresholds
  are their own;
* DARE: the real rows' masks come from the same per-leaf keys and the same
  entry indices (``t * n + j``) with JAX's partitionable threefry, then its base
  is one of the two above;
* Consensus with one lambda for all tasks: a zero row's TALL mask
  ``0 > lambda |tau_MTL|`` is empty, so the task counts are unchanged.

Weight averaging divides by ``T`` and the SVD methods' rank budgets depend on
``T``: they are never padded. Only trees up to `PAD_MAX_BYTES` (padded) are
padded: for large trees run time dominates compile time and the padding would
cost memory. The padded merge is the unpadded one bit for bit
(`tests/test_compilation.py`), up to the sign of a zero sum
(``-0.0 + 0.0 = +0.0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.compilation import size_aware_jit
from subboost.errors import SubboostError
from subboost.task_vectors import in_host_memory
from subboost.tree import PyTree

TASK_BUCKET = 16
PAD_MAX_BYTES = 1 << 26  # 64 MiB of padded task vectors


def padded_task_count(num_tasks: int) -> int:
    """The bucket ``T`` is padded to: the next multiple of `TASK_BUCKET`."""
    return TASK_BUCKET * math.ceil(num_tasks / TASK_BUCKET)


def can_pad(method: Any, tvs: PyTree, kwargs: Mapping[str, Any]) -> bool:
    """Whether `subboost.merge` pads ``tvs`` for ``method`` (a `MergeMethod` record): the method says zero task
    vectors are exact padding with these hyper-parameters, ``T`` is not a bucket already, the padded tree
    fits `PAD_MAX_BYTES`, and ``tvs`` are arrays, not a caller's tracers."""
    if method.pads is None or not method.pads(kwargs):
        return False
    leaves = jax.tree_util.tree_leaves(tvs)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside a caller's jit: its program is per shape anyway
        return False
    num_tasks = leaves[0].shape[0]
    padded = padded_task_count(num_tasks)
    if padded == num_tasks:
        return False
    return sum(math.prod(x.shape[1:]) * padded * np.dtype(x.dtype).itemsize for x in leaves) <= PAD_MAX_BYTES


@size_aware_jit
def _pad_on_device(leaves: list[jax.Array], padding: list[jax.Array]) -> list[jax.Array]:
    return [jnp.concatenate([x, z]) for x, z in zip(leaves, padding)]


def pad_task_axis(tvs: PyTree, num_tasks: int) -> PyTree:
    """``tvs`` with zero task vectors appended up to ``num_tasks`` on the leading axis.

    Host-resident trees are padded by numpy (nothing to compile for each new ``T``);
    others by one small compiled concatenation.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    extra = num_tasks - leaves[0].shape[0]
    if extra < 0:
        raise SubboostError(f"cannot pad {leaves[0].shape[0]} task vectors down to {num_tasks}")
    if all(map(in_host_memory, leaves)):
        # `jax.device_put`, not `jnp.asarray`: the latter compiles a copy program for every new shape.
        padded = [jax.device_put(np.concatenate([np.asarray(x), np.zeros((extra,) + x.shape[1:], x.dtype)]))
                  for x in leaves]
    else:
        padded = _pad_on_device(leaves, [jnp.zeros((extra,) + x.shape[1:], x.dtype) for x in leaves])
    return jax.tree_util.tree_unflatten(treedef, padded)


def threefry_is_partitionable(kwargs: Mapping[str, Any]) -> bool:
    """DARE's masks of the real rows do not depend on ``T``: JAX's partitionable threefry key (the default)."""
    key = kwargs.get("key")
    if key is None or not jax.config.jax_threefry_partitionable:
        return False
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
    return impl == "threefry2x32"


__all__ = ["PAD_MAX_BYTES", "TASK_BUCKET", "can_pad", "pad_task_axis", "padded_task_count", "threefry_is_partitionable"]
