"""The benchmarks' trained models as per-task-count merge settings, for the open-question experiments.

`load_suite` loads (or trains and caches) a suite's base, heads and experts through the
suite's own ``prepare`` (`subboost.bench.suites`), which evaluates the experts once, and hands
out one setting per task count, the harness's `subboost.bench.pipeline.MergeSetting`:
``task_vectors``, ``merge(method)``, ``validation(tau, alphas) -> (A, T)``,
``test(tau, alpha) -> (T,)`` and ``reference`` (the experts' own test accuracies).

The text suite, like ``subboost demo --suite text``, needs ``OPENBLAS_NUM_THREADS=1`` in the environment
(set before Python starts): without it a run was observed spinning for 25 minutes without progress on
2 shared cores, and finished in 2 minutes with it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


import subboost as sb
from subboost.bench.settings import SVD_BATCH_SIZE
from subboost.grids import DEFAULT_BETA

SUITES: tuple[str, ...] = ("vision", "text")
DEFAULT_CACHE = Path("~/.cache/subboost/bench")


@dataclasses.dataclass
class Suite:
    """One suite's trained models. ``setting(T)`` merges the first ``T`` experts."""

    name: str
    config: Any
    task_counts: tuple[int, ...]
    alphas: tuple[float, ...]
    sweep_betas: tuple[float, ...]
    setting: Callable[[int], Any]
    cache_dir: Path
    cache_hit: bool
    load_s: float


def load_suite(suite: str, size: str, *, seed: int = 0, cache_dir: str | Path = DEFAULT_CACHE,
               progress: bool = True, log: Callable[[str], None] = print) -> Suite:
    """Loads the ``suite`` (``"vision"`` or ``"text"``) models of ``size`` from ``cache_dir``, training them if absent."""
    from subboost.bench.suites import get_suite

    if suite not in SUITES:
        raise ValueError(f"--suite {suite!r}: choose one of {', '.join(SUITES)}.")
    start = time.perf_counter()
    config = get_suite(suite).get_config(size)
    trained = get_suite(suite).prepare(config, seed=seed, cache_dir=Path(cache_dir).expanduser(), progress=progress,
                                       log=log)
    return Suite(suite, config, config.task_counts, config.alphas, config.sweep_betas, trained.setting,
                 trained.cache_dir, trained.cache_hit, time.perf_counter() - start)


def boost(tau, beta: float):
    """Subspace Boosting as the benchmark runs it (one layer at a time)."""
    return sb.subspace_boost(tau, beta=beta, batch_size=SVD_BATCH_SIZE)


def prepare_out(out: Path, *, experiment: str, files: tuple[str, ...]) -> None:
    """Creates ``out``; refuses to replace ``files`` there unless its ``results.json`` came from ``experiment``."""
    import json

    clashing = [f for f in files if (out / f).exists()]
    try:
        ours = json.loads((out / "results.json").read_text()).get("experiment") == experiment
    except (OSError, ValueError, AttributeError):
        ours = False
    if clashing and not ours:
        raise FileExistsError(f"--out {out} holds {', '.join(clashing)}, not written by experiments.{experiment}; "
                              "refusing to replace them. Choose another --out.")
    out.mkdir(parents=True, exist_ok=True)


def add_common_arguments(parser) -> None:
    parser.add_argument("--size", default="tiny", choices=("tiny", "default"), help="benchmark size (default: tiny)")
    parser.add_argument("--suite", default="vision", choices=SUITES, help="which offline benchmark (default: vision)")
    parser.add_argument("--seed", type=int, default=0, help="the benchmark's seed (selects the cached models)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                        help="model cache shared with `subboost demo --cache-dir` (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
