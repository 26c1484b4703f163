"""Settings every benchmark suite shares: merge hyper-parameters, the SVD batch size, config checks.

The merge methods' hyper-parameters are read from their signatures (one home for a default:
the function); Consensus's per-task lambda is its default, fixed instead of tuned per task.
Weight averaging runs at a fixed alpha of 1: with a tuned alpha it would equal Task Arithmetic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.ties import ties

# SVD-based steps run one layer at a time (`batch_size=1`, same result). jaxlib
# 0.10.2's CPU LAPACK kernels split a batch of matrices over the intra-op thread
# pool and block until it finishes; two such kernels running at once on a
# 2-thread pool wait on each other forever (observed: the unchunked Iso-CTS of
# the tiny model at T = 4, 7 and 10). One layer at a time leaves far fewer
# batched kernels that can run concurrently; a boost of a single matrix runs inline.
SVD_BATCH_SIZE = 1


def default_of(fn: Callable, name: str) -> Any:
    """The default of keyword ``name`` in ``fn``'s signature (the one place a method's default lives)."""
    parameter = inspect.signature(fn).parameters[name]
    if parameter.default is inspect.Parameter.empty:
        raise TypeError(f"{fn.__name__}'s argument {name!r} has no default.")
    return parameter.default


DEFAULT_METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "ties": {"k": default_of(ties, "k")},
    "dare": {"p": default_of(dare, "p")},
    "consensus": {"min_tasks": default_of(consensus, "min_tasks"), "lambdas": default_of(consensus, "lambdas")},
    "tsv": {"batch_size": SVD_BATCH_SIZE},
    "iso_c": {"batch_size": SVD_BATCH_SIZE},
    "iso_cts": {"batch_size": SVD_BATCH_SIZE},
}
DEFAULT_FIXED_ALPHAS: dict[str, float] = {"weight_averaging": 1.0}


def check_suite_settings(config: Any, *, available_tasks: int, betas: tuple[str, ...] = ("betas",)) -> None:
    """The checks every suite config shares: task counts, the alpha grid, the beta grids.

    Raises ValueError naming the config class and field.
    """
    name = type(config).__name__
    if not 1 <= config.num_tasks <= available_tasks:
        raise ValueError(f"{name}.num_tasks must be in [1, {available_tasks}], got {config.num_tasks}.")
    if not config.task_counts or any(not 1 <= k <= config.num_tasks for k in config.task_counts):
        raise ValueError(f"{name}.task_counts must lie in [1, num_tasks={config.num_tasks}], got {config.task_counts}.")
    if list(config.task_counts) != sorted(set(config.task_counts)):
        raise ValueError(f"{name}.task_counts must be strictly increasing, got {config.task_counts}.")
    if any(a <= 0 for a in config.alphas) or list(config.alphas) != sorted(set(config.alphas)):
        raise ValueError(f"{name}.alphas must be positive and strictly increasing, got {config.alphas}.")
    for field in betas:
        if any(not 0.0 <= b <= 1.0 for b in getattr(config, field)):
            raise ValueError(f"{name}.{field} must lie in [0, 1], got {getattr(config, field)}.")
