"""What `experiments.many_experts` and `experiments.noisy_experts` share: trained models -> merges -> tables.

Both reuse the mini-benchmark's pipeline (`subboost.bench.pipeline`): `load_or_train`
(cached by training key), `evaluate_merges` (every method plain and boosted, alpha
and beta chosen on validation by `subboost.bench.sweep.select`) and the same
normalized accuracy (merged / expert test accuracy per task, averaged).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from subboost.bench import evaluate as bench_eval
from subboost.bench.config import BenchConfig
from subboost.bench.pipeline import BenchModels, MergeSetting, evaluate_merges, load_or_train, methods_to_run

METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts")


def parse_args(description: str, default_out: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=("tiny", "default"), default="default")
    parser.add_argument("--suite", choices=("vision", "text"), default="vision")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--cache-dir", default=None, help="model cache root (default: <out>/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out not made by a run")
    args = parser.parse_args(argv)
    if args.suite == "text":
        parser.error("--suite text is not supported by this experiment: its task set and label-noise option "
                     "exist for the vision suite only (subboost.bench); run it with --suite vision.")
    return args


def clean_test_accuracies(models: BenchModels) -> tuple[np.ndarray, np.ndarray]:
    """``(pretrained, experts)`` clean test accuracy per task, each ``(num_tasks,)``."""
    config, data = models.config, models.data
    static = {"model": config.model, "batch": config.eval_batch}
    heads = jax.tree_util.tree_map(jnp.asarray, models.heads)
    images, labels = jnp.asarray(data.test.images), jnp.asarray(data.test.labels)
    pretrained = np.asarray(bench_eval.accuracies(models.base, images, labels, heads, **static))
    experts = np.asarray(bench_eval.expert_accuracies(models.experts, images, labels, heads, **static))
    return pretrained, experts


def merge_at_counts(models: BenchModels, expert_test: np.ndarray, *, seed: int, progress: bool = True,
                    desc: str = "merging") -> list[dict[str, Any]]:
    """`evaluate_merges` at each of ``config.task_counts``: ``[{"num_tasks", "methods", "seconds"}, ...]``."""
    config = models.config
    out = []
    with tqdm(total=len(config.task_counts) * len(methods_to_run(config)), desc=desc, unit="method",
              disable=not progress, leave=False) as bar:
        for num_tasks in config.task_counts:
            start = time.perf_counter()
            setting = MergeSetting(config, models.data, models.base, models.heads, models.experts, expert_test,
                                   num_tasks, seed)
            merged = evaluate_merges(setting, bar=bar)
            out.append({"num_tasks": num_tasks, "methods": merged, "seconds": time.perf_counter() - start})
    return out


def load(config: BenchConfig, *, seed: int, cache_dir: str | Path, progress: bool,
         log: Callable[[str], None]) -> BenchModels:
    return load_or_train(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)


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
