"""Benchmark suites, registered by name as merge methods are.

A suite supplies only what differs between benchmarks (tasks and data, the pretrained model,
frozen heads, fine-tuning, accuracy at given parameters); the harness
(`subboost.bench.pipeline.run_benchmark`) does the rest: model cache, merges, alpha / beta
selection, the boosting sweep, report, figures and output folder.

A suite is a `Suite` record handed to `register_suite` when its package is imported. The
built-in ones (``vision``, ``text``) are imported on first use by `get_suite`, so importing the
registry costs nothing. ``subboost demo --suite NAME`` runs any registered suite.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

# Built-in suites: name -> the package whose import registers it.
BUILTIN_SUITES: dict[str, str] = {
    "vision": "subboost.bench.suites.vision",
    "text": "subboost.bench.suites.text",
}


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a benchmark suite supplies to the harness.

    Attributes:
      name: the registry key (``subboost demo --suite NAME``); also ``config.suite`` of its configs.
      description: one line for ``--help``.
      sizes: the names `get_config` accepts (the first is the CI size).
      get_config: ``(size, **overrides) -> config``. A config is a frozen dataclass with at least
        ``name``, ``suite``, ``task_counts``, ``num_tasks``, ``methods``, ``method_kwargs``,
        ``fixed_alphas``, ``alphas``, ``betas``, ``sweep_methods``, ``sweep_betas`` and `to_dict`.
      prepare: ``(config, *, seed, cache_dir, progress, log) -> subboost.bench.pipeline.TrainedSuite``:
        data, cached (or trained and cached) base, heads and experts, their test accuracies, and the
        evaluator of merged task vectors.
      markdown_tables: ``results -> str``: the report's tables (deterministic given the seed); the
        harness appends the wall time.
      title: the figures' title.
      default_out: the default output folder of ``subboost demo --suite NAME``.
      cached_words, trained_words: how the report's wall-time line names a cache hit and a miss.
    """

    name: str
    description: str
    sizes: tuple[str, ...]
    get_config: Callable[..., Any]
    prepare: Callable[..., Any]
    markdown_tables: Callable[[dict[str, Any]], str]
    title: str
    default_out: str
    cached_words: str = "reused cached models"
    trained_words: str = "trained the models"


_REGISTRY: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    """Adds ``suite`` to the registry (a name registered twice is an error) and returns it."""
    if not isinstance(suite, Suite):
        raise TypeError(f"register_suite takes a Suite record, got {type(suite).__name__}.")
    if suite.name in _REGISTRY and _REGISTRY[suite.name] is not suite:
        raise ValueError(f"a benchmark suite named {suite.name!r} is already registered.")
    _REGISTRY[suite.name] = suite
    return suite


def available_suites() -> tuple[str, ...]:
    """Names of the built-in and registered suites."""
    return tuple(dict.fromkeys([*BUILTIN_SUITES, *_REGISTRY]))


def get_suite(name: str) -> Suite:
    """The suite registered as ``name`` (a built-in one is imported on first use)."""
    if name not in _REGISTRY and name in BUILTIN_SUITES:
        importlib.import_module(BUILTIN_SUITES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown benchmark suite {name!r}; available: {', '.join(available_suites())}.")
    return _REGISTRY[name]
