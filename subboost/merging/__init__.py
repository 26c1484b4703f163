"""Merge methods by name: ``sb.merge(tvs, method=..., **hyper_parameters)``.

Every method is a pure function ``stacked task vectors -> merged task vector``
importable from its own module; this registry adds validation and a cached
`jax.jit` per method in which hyper-parameters are static (so a second call
with same-shaped inputs and the same hyper-parameters does not recompile).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from subboost.compilation import can_flatten, flat_merge
from subboost.merging.averaging import task_arithmetic, weight_averaging
from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.iso import check_common_space_fraction, iso_c, iso_cts
from subboost.merging.ties import ties
from subboost.merging.tsv import check_batch_size, tsv
from subboost.task_vectors import SubboostError, check_finite, check_floating, num_experts
from subboost.tree import PyTree
from subboost.validation import check_int, check_real

# Arguments that are arrays (traced); every other keyword is a static hyper-parameter.
DYNAMIC_ARGUMENTS = frozenset({"key"})

METHODS: dict[str, Callable[..., PyTree]] = {
    "weight_averaging": weight_averaging,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "consensus": consensus,
}

# Per-method hyper-parameter checks: name -> (predicate, message).
_CHECKS: dict[str, Callable[[dict[str, Any], int], None]] = {}


def register(name: str, fn: Callable[..., PyTree], check: Callable[[dict[str, Any], int], None] | None = None) -> None:
    """Adds a merge method to the registry (``check(kwargs, T)`` validates its hyper-parameters)."""
    METHODS[name] = fn
    if check is not None:
        _CHECKS[name] = check
    _jitted.cache_clear()
    _jitted_flat.cache_clear()


def available_methods() -> tuple[str, ...]:
    """Names accepted by `merge`."""
    return tuple(METHODS)


def _check_fraction(name: str, value: Any, *, low_open: bool, high_open: bool, what: str) -> None:
    check_real(name, value, what=what, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def _check_ties(kwargs: dict[str, Any], num_tasks: int, what: str = "ties") -> None:
    _check_fraction("k", kwargs.get("k", 0.2), low_open=True, high_open=False, what=what)


def _check_dare(kwargs: dict[str, Any], num_tasks: int) -> None:
    if kwargs.get("key") is None:
        raise SubboostError("dare: pass an explicit PRNG key, e.g. key=jax.random.key(0).")
    _check_fraction("p", kwargs.get("p", 0.9), low_open=False, high_open=True, what="dare")
    if kwargs.get("base", "task_arithmetic") == "ties":
        _check_ties(kwargs, num_tasks, "dare")


def _check_consensus(kwargs: dict[str, Any], num_tasks: int) -> None:
    check_int("k", kwargs.get("k", 2), what="consensus", low=1, high=num_tasks)
    lambdas = kwargs.get("lambdas", 0.4)
    if not isinstance(lambdas, str) and np.ndim(lambdas) >= 1:  # one per task
        if np.ndim(lambdas) != 1 or len(lambdas) != num_tasks:
            raise SubboostError(f"consensus: got {np.size(lambdas)} lambdas for {num_tasks} tasks "
                                "(one per task, or one for all).")
        for t, value in enumerate(lambdas):
            check_real(f"lambdas[{t}]", value, what="consensus", low=0.0, low_open=True)
    else:  # TALL masks |tau_t| > lambda |tau_MTL - tau_t|: lambda <= 0 keeps everything, NaN nothing
        check_real("lambdas", lambdas, what="consensus", low=0.0, low_open=True)
    if kwargs.get("base", "task_arithmetic") == "ties":
        _check_fraction("ties_k", kwargs.get("ties_k", 0.2), low_open=True, high_open=False, what="consensus")


_CHECKS.update({"ties": _check_ties, "dare": _check_dare, "consensus": _check_consensus})


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


@functools.lru_cache(maxsize=None)
def _jitted(name: str, static_names: tuple[str, ...]) -> Callable[..., PyTree]:
    return jax.jit(METHODS[name], static_argnames=static_names)


@functools.lru_cache(maxsize=None)
def _jitted_flat(name: str, static_names: tuple[str, ...]) -> Callable[..., PyTree]:
    return jax.jit(functools.partial(flat_merge, METHODS[name]), static_argnames=static_names)


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
    if method not in METHODS:
        raise SubboostError(f"unknown merge method {method!r}; known methods: {', '.join(METHODS)}.")
    fn = METHODS[method]
    accepted = inspect.signature(fn).parameters
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted and not takes_var_kwargs]
    if unknown:
        valid = [k for k in accepted if k != "tvs"]
        raise SubboostError(f"{method}: unknown hyper-parameter(s) {unknown}; valid ones: {valid}.")
    num_tasks = num_experts(tvs)
    if validate:
        check_floating(tvs, what="task vectors")
        check_finite(tvs, what="task vectors")
    if method in _CHECKS:
        _CHECKS[method](kwargs, num_tasks)
    if validate and method in SVD_METHODS:
        _require_matrices(tvs, method, kwargs)
    kwargs = {k: _hashable(v) for k, v in kwargs.items()}
    static_names = tuple(sorted(k for k in kwargs if k not in DYNAMIC_ARGUMENTS))
    if mesh is not None:
        from subboost.sharding import merge_on_mesh

        return merge_on_mesh(tvs, method, mesh=mesh, **kwargs)
    if can_flatten(fn, tvs, kwargs):  # one (T, N) leaf: a much smaller program, the same result
        merged = _jitted_flat(method, static_names)(tvs, **kwargs)
    else:
        merged = _jitted(method, static_names)(tvs, **kwargs)
    if validate:  # e.g. a float16 sum of large task vectors overflows to inf
        check_finite(merged, what=f"{method}: the merged task vector (overflow in its dtype?)")
    return merged


# Methods that act on matrices only: a tree without one would silently be averaged.
SVD_METHODS = frozenset({"tsv", "iso_c", "iso_cts"})


def _require_matrices(tvs: PyTree, method: str, kwargs: dict[str, Any]) -> None:
    from subboost.tree import matrix_plan
    from subboost.validation import no_matrices_message

    is_matrix = kwargs.get("is_matrix")
    plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=kwargs.get("attention", "per_qkv"))
    if not plan.members:
        raise SubboostError(no_matrices_message(tvs, what=method, is_matrix=is_matrix, lead_ndim=1))


def _check_svd_merge(kwargs: dict[str, Any], num_tasks: int, what: str) -> None:
    check_batch_size(kwargs.get("batch_size"), what)
    if what == "iso_cts":
        check_common_space_fraction(kwargs.get("common_space_fraction", 0.8), what)


# Matrix shapes are checked against T inside each method (at trace time), naming the parameter.
for _name, _fn in (("tsv", tsv), ("iso_c", iso_c), ("iso_cts", iso_cts)):
    register(_name, _fn, functools.partial(_check_svd_merge, what=_name))


__all__ = [
    "METHODS",
    "available_methods",
    "consensus",
    "dare",
    "iso_c",
    "iso_cts",
    "merge",
    "register",
    "task_arithmetic",
    "ties",
    "tsv",
    "weight_averaging",
]
