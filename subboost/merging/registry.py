"""One record per merge method: what `subboost.merge`, sharding and streaming know about it.

A `MergeMethod` holds

* ``fn``: the pure function ``stacked task vectors -> merged task vector``;
* ``arguments``: the hyper-parameter names it accepts, given the others (DARE
  and Consensus accept TIES's ``k``, ``merge`` and ``scope`` only with
  ``base="ties"``), so an unknown name is refused before anything runs;
* ``check``: ``check(kwargs, num_tasks)`` validates their values, raising
  `SubboostError` that names the argument;
* ``matrix_kernel``: for methods that act on each matrix alone (TSV-M, Iso):
  the function to run on a tree of stacked matrices (``is_matrix`` and
  ``attention`` keywords); the mesh path splits matrix groups across devices
  with it, and a tree without any matrix is refused. ``None`` otherwise;
* ``streaming``: ``streaming(kwargs) -> StreamingScheme`` saying how
  `subboost.streaming.merge_from_checkpoints` runs it chunk by chunk, or
  ``None`` if it cannot be streamed;
* ``flattens``: ``flattens(kwargs) -> bool``, whether with these
  hyper-parameters ``flat_fn`` gives ``fn``'s result entry for entry from a
  smaller program that merges the leaves concatenated into one ``(T, N)`` leaf
  (`subboost.merging.flat`); ``None``: never. Only methods that run TIES's
  global trim flatten: for the others the concatenation costs more compilation
  than it saves;
* ``pads``: ``pads(kwargs) -> bool``, whether zero task vectors appended to the
  task axis leave the result unchanged, so `subboost.merge` may pad ``T`` to a
  bucket and reuse one compiled program (`subboost.merging.padding`); ``None``: never;
* ``display_name``: the name tables and plots show (``label``: it, or ``name``);
  ``reference``: the method's paper as an arXiv id.

Names used across methods (one name per concept): ``k`` is always TIES's trim
fraction (in ``ties``, ``dare(base="ties")`` and ``consensus(base="ties")``);
``min_tasks`` is Consensus's task count (the paper's ``k``); ``p`` is DARE's
drop probability; ``base`` the merge DARE and Consensus are applied to.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from subboost.errors import SubboostError
from subboost.merging.averaging import task_arithmetic, weight_averaging
from subboost.merging.consensus import MASK_FROM, consensus
from subboost.merging.dare import BASES, dare, dare_flat
from subboost.merging.flat import flat_merge
from subboost.merging.padding import threefry_is_partitionable
from subboost.merging.iso import check_common_space_fraction, iso_c, iso_cts
from subboost.merging.ties import MERGE_MODES, TRIM_SCOPES, ties
from subboost.merging.tsv import check_batch_size, tsv
from subboost.quick_compile import size_aware_jit
from subboost.tree import PyTree
from subboost.validation import check_choice, check_int, check_real

# Arguments that are arrays (traced); every other keyword is a static hyper-parameter.
DYNAMIC_ARGUMENTS = frozenset({"key"})

Check = Callable[[Mapping[str, Any], int], None]


@dataclasses.dataclass(frozen=True)
class StreamingScheme:
    """How a method runs when experts are streamed from disk, chunk by chunk.

    Attributes:
      local: the registered method, run on each chunk as is: its output at a
        parameter (or matrix) depends on that parameter (or matrix) alone.
        ``None``: the elementwise scheme below, with global statistics.
      local_kwargs: its hyper-parameters.
      drop_p: DARE's drop probability (``None``: no drop).
      ties: TIES's ``(k, merge, scope)`` (``None``: plain sum after the drop).
      consensus: Consensus's ``(lambdas, min_tasks)`` mask applied to the TIES merge.
    """

    local: str | None = None
    local_kwargs: tuple[tuple[str, Any], ...] = ()
    drop_p: float | None = None
    ties: tuple[float, str, str] | None = None
    consensus: tuple[Any, int] | None = None


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """Everything the library knows about one merge method (see the module docstring)."""

    name: str
    fn: Callable[..., PyTree]
    arguments: Callable[[Mapping[str, Any]], tuple[str, ...]]
    check: Check | None = None
    matrix_kernel: Callable[..., PyTree] | None = None
    streaming: Callable[[Mapping[str, Any]], StreamingScheme] | None = None
    flattens: Callable[[Mapping[str, Any]], bool] | None = None
    flat_fn: Callable[..., PyTree] | None = None
    pads: Callable[[Mapping[str, Any]], bool] | None = None
    display_name: str = ""
    reference: str = ""

    @property
    def label(self) -> str:
        """The name reports and plots show: ``display_name``, or ``name`` when none is set."""
        return self.display_name or self.name


def signature_arguments(fn: Callable) -> tuple[str, ...]:
    """The keyword hyper-parameters of ``fn`` (every parameter after the task vectors, ``**`` excluded)."""
    parameters = list(inspect.signature(fn).parameters.values())[1:]
    return tuple(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD)


def _default(fn: Callable, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


# ----------------------------------------------------------------------------
# Checks: each raises SubboostError naming the argument
# ----------------------------------------------------------------------------
def _ties_settings(kwargs: Mapping[str, Any], what: str) -> tuple[float, str, str]:
    """TIES's ``(k, merge, scope)``, checked."""
    k = check_real("k", kwargs.get("k", _default(ties, "k")), what=what, low=0.0, high=1.0, low_open=True)
    merge = check_choice("merge", kwargs.get("merge", _default(ties, "merge")), MERGE_MODES, what=what)
    scope = check_choice("scope", kwargs.get("scope", _default(ties, "scope")), TRIM_SCOPES, what=what)
    return k, merge, scope


def _base(kwargs: Mapping[str, Any], fn: Callable, what: str) -> str:
    return check_choice("base", kwargs.get("base", _default(fn, "base")), BASES, what=what)


def _check_ties(kwargs: Mapping[str, Any], num_tasks: int) -> None:
    _ties_settings(kwargs, "ties")


def _check_dare(kwargs: Mapping[str, Any], num_tasks: int) -> None:
    if kwargs.get("key") is None:
        raise SubboostError("dare: pass an explicit PRNG key, e.g. key=jax.random.key(0).")
    check_real("p", kwargs.get("p", _default(dare, "p")), what="dare", low=0.0, high=1.0, high_open=True)
    if _base(kwargs, dare, "dare") == "ties":
        _ties_settings(kwargs, "dare")


def _check_consensus(kwargs: Mapping[str, Any], num_tasks: int) -> None:
    check_int("min_tasks", kwargs.get("min_tasks", _default(consensus, "min_tasks")), what="consensus",
              low=1, high=num_tasks)
    check_choice("mask_from", kwargs.get("mask_from", _default(consensus, "mask_from")), MASK_FROM,
                 what="consensus")
    lambdas = kwargs.get("lambdas", _default(consensus, "lambdas"))
    if not isinstance(lambdas, str) and np.ndim(lambdas) >= 1:  # one per task
        if np.ndim(lambdas) != 1 or len(lambdas) != num_tasks:
            raise SubboostError(f"consensus: got {np.size(lambdas)} lambdas for {num_tasks} tasks "
                                "(one per task, or one for all).")
        for t, value in enumerate(lambdas):
            check_real(f"lambdas[{t}]", value, what="consensus", low=0.0, low_open=True)
    else:  # TALL masks |tau_t| > lambda |tau_MTL - tau_t|: lambda <= 0 keeps everything, NaN nothing
        check_real("lambdas", lambdas, what="consensus", low=0.0, low_open=True)
    if _base(kwargs, consensus, "consensus") == "ties":
        _ties_settings(kwargs, "consensus")


def _check_svd_merge(kwargs: Mapping[str, Any], num_tasks: int, *, what: str) -> None:
    check_batch_size(kwargs.get("batch_size"), what)
    if what == "iso_cts":
        check_common_space_fraction(kwargs.get("common_space_fraction", 0.8), what)


# ----------------------------------------------------------------------------
# Accepted arguments and streaming schemes
# ----------------------------------------------------------------------------
_TIES_ARGUMENTS = ("k", "merge", "scope")


def _with_base(fn: Callable) -> Callable[[Mapping[str, Any]], tuple[str, ...]]:
    """DARE / Consensus: their own arguments, plus TIES's when ``base="ties"``."""

    def arguments(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        own = signature_arguments(fn)
        return own + (_TIES_ARGUMENTS if kwargs.get("base", _default(fn, "base")) == "ties" else ())

    return arguments


def _always(kwargs: Mapping[str, Any]) -> bool:
    return True


def _one_lambda(kwargs: Mapping[str, Any]) -> bool:
    """Consensus: a zero task vector's TALL mask ``0 > lambda |tau_MTL|`` is empty, given one lambda for all."""
    lambdas = kwargs.get("lambdas", _default(consensus, "lambdas"))
    return isinstance(lambdas, str) or np.ndim(lambdas) == 0


def _trims_globally(kwargs: Mapping[str, Any]) -> bool:
    """TIES with its global trim: one threshold over all parameters, so flat is exact."""
    return kwargs.get("scope", _default(ties, "scope")) == "global"


def _on_global_ties(fn: Callable) -> Callable[[Mapping[str, Any]], bool]:
    """DARE / Consensus flatten when their base merge is TIES with its global trim."""
    return lambda kwargs: kwargs.get("base", _default(fn, "base")) == "ties" and _trims_globally(kwargs)


def local_scheme(name: str) -> Callable[[Mapping[str, Any]], StreamingScheme]:
    """The scheme of a method run on each chunk as is (exact: it is local per parameter / matrix)."""
    return lambda kwargs: StreamingScheme(local=name, local_kwargs=tuple(sorted(kwargs.items())))


def _stream_ties(kwargs: Mapping[str, Any]) -> StreamingScheme:
    return StreamingScheme(ties=_ties_settings(kwargs, "ties"))


def _stream_dare(kwargs: Mapping[str, Any]) -> StreamingScheme:
    p = kwargs.get("p", _default(dare, "p"))
    ties_settings = _ties_settings(kwargs, "dare") if _base(kwargs, dare, "dare") == "ties" else None
    return StreamingScheme(drop_p=p, ties=ties_settings)


def _stream_consensus(kwargs: Mapping[str, Any]) -> StreamingScheme:
    if _base(kwargs, consensus, "consensus") == "task_arithmetic":  # TALL masks and tau_MTL are elementwise
        return local_scheme("consensus")(kwargs)
    if kwargs.get("mask_from", "sum") != "sum":  # masks against the TIES vector need it whole first
        raise SubboostError("consensus: mask_from='merged' with base='ties' cannot be streamed; use mask_from='sum'.")
    return StreamingScheme(
        ties=_ties_settings(kwargs, "consensus"),
        consensus=(kwargs.get("lambdas", _default(consensus, "lambdas")),
                   kwargs.get("min_tasks", _default(consensus, "min_tasks"))),
    )


# ----------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------
METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Adds (or replaces) a merge method's record; returns it."""
    METHODS[method.name] = method
    jitted.cache_clear()
    jitted_flat.cache_clear()
    return method


def method_record(name: str) -> MergeMethod:
    """The record of ``name``; `SubboostError` listing the known methods otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise SubboostError(f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[name]


def check_arguments(name: str, kwargs: Mapping[str, Any], num_tasks: int) -> MergeMethod:
    """Refuses unknown hyper-parameter names and bad values of ``name``'s; returns its record."""
    method = method_record(name)
    valid = method.arguments(kwargs)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise SubboostError(f"{name}: unknown hyper-parameter(s) {unknown}; valid ones: {list(valid)}.")
    if method.check is not None:
        method.check(kwargs, num_tasks)
    return method


@functools.lru_cache(maxsize=None)
def jitted(name: str, static_names: tuple[str, ...]) -> Callable[..., PyTree]:
    """``jax.jit`` of the method with ``static_names`` static, cached per method and names."""
    return size_aware_jit(METHODS[name].fn, static_argnames=static_names)


@functools.lru_cache(maxsize=None)
def jitted_flat(name: str, static_names: tuple[str, ...]) -> Callable[..., PyTree]:
    """`jitted` of the method's ``flat_fn``: the same result from a much smaller program."""
    return size_aware_jit(METHODS[name].flat_fn, static_argnames=static_names)


def _simple(name: str, fn: Callable, **fields: Any) -> MergeMethod:
    return MergeMethod(name=name, fn=fn, arguments=lambda kwargs: signature_arguments(fn), **fields)


for _record in (
    _simple("weight_averaging", weight_averaging, streaming=local_scheme("weight_averaging"),
            display_name="Weight averaging", reference="2203.05482"),
    _simple("task_arithmetic", task_arithmetic, streaming=local_scheme("task_arithmetic"), pads=_always,
            display_name="Task Arithmetic", reference="2212.04089"),
    _simple("ties", ties, check=_check_ties, streaming=_stream_ties, flattens=_trims_globally,
            flat_fn=functools.partial(flat_merge, ties), pads=_always, display_name="TIES", reference="2306.01708"),
    MergeMethod("dare", dare, _with_base(dare), check=_check_dare, streaming=_stream_dare,
                flattens=_on_global_ties(dare), flat_fn=dare_flat, pads=threefry_is_partitionable,
                display_name="DARE", reference="2311.03099"),
    MergeMethod("consensus", consensus, _with_base(consensus), check=_check_consensus, streaming=_stream_consensus,
                flattens=_on_global_ties(consensus), flat_fn=functools.partial(flat_merge, consensus),
                pads=_one_lambda, display_name="Consensus TA", reference="2405.07813"),
    *(
        _simple(name, fn, check=functools.partial(_check_svd_merge, what=name), matrix_kernel=fn,
                streaming=local_scheme(name), display_name=label, reference=arxiv)
        for name, fn, label, arxiv in (("tsv", tsv, "TSV-M", "2412.00081"), ("iso_c", iso_c, "Iso-C", "2502.04959"),
                                       ("iso_cts", iso_cts, "Iso-CTS", "2502.04959"))
    ),
):
    register(_record)


__all__ = [
    "DYNAMIC_ARGUMENTS",
    "METHODS",
    "MergeMethod",
    "StreamingScheme",
    "check_arguments",
    "jitted",
    "local_scheme",
    "method_record",
    "register",
    "signature_arguments",
]
