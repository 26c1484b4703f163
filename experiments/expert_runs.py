"""What `experiments.many_experts` and `experiments.noisy_experts` share: trained models -> merges -> tables.

Both reuse the benchmark harness (`subboost.bench.pipeline`) on a suite's trained models: the
suite's ``prepare`` (cached by training key), ``evaluate_merges`` (every method plain and boosted,
alpha and beta chosen on validation by `subboost.bench.sweep.select`) and the same normalized accuracy
(merged / expert test accuracy per task, averaged). `load` hands both suites' models
to the experiments through one interface, `Models`.

The text suite needs ``OPENBLAS_NUM_THREADS=1`` in the environment (see `experiments.merge_settings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from subboost.bench.pipeline import evaluate_merges, methods_to_run
from subboost.bench.suites import get_suite
from subboost.bench.suites.text.config import TextBenchConfig
from subboost.bench.suites.vision.config import BenchConfig

METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts")


def parse_args(description: str, default_out: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=("tiny", "default"), default="default")
    parser.add_argument("--suite", choices=("vision", "text"), default="vision")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--cache-dir", default=None, help="model cache root (default: <out>/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out not made by a run")
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Models:
    """One suite's trained models, as both experiments read them.

    Attributes:
      config: the `BenchConfig` or `TextBenchConfig` they were trained with.
      task_names, num_classes: per task, in order.
      base, experts: the merged parameters (vision: the encoder; text: the transformer blocks), pretrained
        and fine-tuned (stacked on a leading task axis).
      pretrained_test, expert_test: clean test accuracy per task, ``(num_tasks,)``.
      setting: ``num_tasks -> `` the harness's `subboost.bench.pipeline.MergeSetting` of the first tasks.
      evaluate: ``(num_tasks, bar) -> `` the suite's ``evaluate_merges`` at that count.
    """

    config: BenchConfig | TextBenchConfig
    task_names: list[str]
    num_classes: list[int]
    base: dict
    experts: dict
    pretrained_test: np.ndarray
    expert_test: np.ndarray
    setting: Callable[[int], Any]
    evaluate: Callable[[int, Any], dict[str, Any]]
    cache_dir: Path
    cache_hit: bool
    timings: dict[str, float]


def load(config: BenchConfig | TextBenchConfig, *, seed: int, cache_dir: str | Path, progress: bool,
         log: Callable[[str], None]) -> Models:
    """``config``'s models from ``cache_dir`` (trained and cached when absent), evaluated once on test
    (the suite's own ``prepare``, `subboost.bench.suites`)."""
    trained = get_suite(config.suite).prepare(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    return Models(config, [t["name"] for t in trained.tasks], [int(t["num_classes"]) for t in trained.tasks],
                  trained.base, trained.experts, trained.pretrained_test, trained.expert_test, trained.setting,
                  lambda num_tasks, bar: evaluate_merges(trained.setting(num_tasks), bar=bar), trained.cache_dir,
                  trained.cache_hit, trained.timings)


def merge_at_counts(models: Models, *, progress: bool = True, desc: str = "merging") -> list[dict[str, Any]]:
    """The suite's ``evaluate_merges`` at each of ``config.task_counts``: ``[{"num_tasks", "methods", "seconds"}, ...]``."""
    config = models.config
    out = []
    with tqdm(total=len(config.task_counts) * len(methods_to_run(config)), desc=desc, unit="method",
              disable=not progress, leave=False) as bar:
        for num_tasks in config.task_counts:
            start = time.perf_counter()
            merged = models.evaluate(num_tasks, bar)
            out.append({"num_tasks": num_tasks, "methods": merged, "seconds": time.perf_counter() - start})
    return out


def fmt(entry: dict[str, Any] | None, variant: str, field: str = "normalized", *, percent: bool = True) -> str:
    """One table cell of a method entry of `evaluate_merges` (``n/a`` when the method could not run)."""
    if entry is None or entry.get("status") != "ok":
        return "n/a"
    value = entry[variant][field]
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
