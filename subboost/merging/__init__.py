"""Merge methods by name: ``sb.merge(tvs, method=..., **hyper_parameters)``.

Every method is a pure function ``stacked task vectors -> merged task vector``
importable from its own module; its record in `subboost.merging.registry`
(accepted arguments, checks, matrix kernel, streaming scheme) is what `merge`,
sharding and streaming read. `merge` adds validation and a cached `jax.jit`
per method in which hyper-parameters are static (so a second call with
same-shaped inputs and the same hyper-parameters does not recompile).
"""

from __future__ import annotations

from typing import Any

import jax

from subboost.merging.averaging import task_arithmetic, weight_averaging
from subboost.merging.cart import cart
from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.flat import can_flatten
from subboost.merging.padding import can_pad, pad_task_axis, padded_task_count
from subboost.merging.iso import iso_c, iso_cts
from subboost.merging.magmax import magmax
from subboost.merging.model_stock import model_stock
from subboost.merging.registry import (
    DYNAMIC_ARGUMENTS,
    METHODS,
    MergeMethod,
    check_arguments,
    jitted,
    jitted_flat,
    method_record,
    register,
)
from subboost.merging.ties import ties
from subboost.merging.star import star
from subboost.merging.tsv import tsv
from subboost.merging.wudi import wudi
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite, check_floating, num_experts
from subboost.tree import PyTree, matrix_plan
from subboost.validation import no_matrices_message


def available_methods() -> tuple[str, ...]:
    """Names accepted by `merge`."""
    return tuple(METHODS)


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def merge(
    tvs: PyTree,
    method: str = "task_arithmetic",
    *,
    validate: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    **kwargs: Any,
) -> PyTree:
    """Merges stacked task vectors with a named method.

    Args:
      tvs: stacked task vectors from `subboost.task_vectors` (leading axis T).
      method: one of `available_methods()`.
      validate: check the input (expert axis, float dtypes, finiteness; one host sync).
      mesh: run over this device mesh (`subboost.sharding`): matrix groups split
        along G, elementwise methods over parameters; the result is replicated.
      **kwargs: the method's hyper-parameters (see its docstring).

    Returns:
      The merged task vector, with the structure of a single expert.
    """
    method_record(method)
    num_tasks = num_experts(tvs)
    if validate:
        check_floating(tvs, what="task vectors")
        check_finite(tvs, what="task vectors")
    record = check_arguments(method, kwargs, num_tasks)
    if validate and record.matrix_kernel is not None:
        _require_matrices(tvs, method, kwargs)
    kwargs = {k: _hashable(v) for k, v in kwargs.items()}
    static_names = tuple(sorted(k for k in kwargs if k not in DYNAMIC_ARGUMENTS))
    if mesh is not None:
        from subboost.sharding import merge_on_mesh

        return merge_on_mesh(tvs, method, mesh=mesh, jitted=jitted(method, static_names), matrix_kernel=record.matrix_kernel,
                             hyper_parameters=kwargs, dynamic=DYNAMIC_ARGUMENTS)
    if can_pad(record, tvs, kwargs):  # zero task vectors up to a bucket: one program for many T, the same result
        tvs = pad_task_axis(tvs, padded_task_count(num_tasks))
    if can_flatten(record, tvs, kwargs):  # one (T, N) leaf: a much smaller program, the same result
        merged = jitted_flat(method, static_names)(tvs, **kwargs)
    else:
        merged = jitted(method, static_names)(tvs, **kwargs)
    if validate:  # e.g. a float16 sum of large task vectors overflows to inf
        check_finite(merged, what=f"{method}: the merged task vector (overflow in its dtype?)")
    return merged


def _require_matrices(tvs: PyTree, method: str, kwargs: dict[str, Any]) -> None:
    """A method acting on matrices only would silently average a tree without one: refused."""
    is_matrix = kwargs.get("is_matrix")
    plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=kwargs.get("attention", "per_qkv"))
    if not plan.members:
        raise SubboostError(no_matrices_message(tvs, what=method, is_matrix=is_matrix, lead_ndim=1))


__all__ = [
    "DYNAMIC_ARGUMENTS",
    "METHODS",
    "MergeMethod",
    "available_methods",
    "cart",
    "check_arguments",
    "consensus",
    "dare",
    "iso_c",
    "iso_cts",
    "jitted",
    "magmax",
    "merge",
    "method_record",
    "model_stock",
    "register",
    "star",
    "task_arithmetic",
    "ties",
    "tsv",
    "weight_averaging",
    "wudi",
]
