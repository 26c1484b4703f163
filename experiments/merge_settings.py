"""The benchmarks' trained models as per-task-count merge settings, for the open-question experiments.

`load_suite` loads (or trains and caches) a suite's base, heads and experts through the
benchmarks' own `load_or_train` (vision: `subboost.bench.pipeline`; text:
`subboost.text_bench.pipeline`), evaluates the experts once, and hands out one setting
per task count. A setting has the interface of `subboost.bench.pipeline.MergeSetting`:
``task_vectors``, ``merge(method)``, ``validation(tau, alphas) -> (A, T)``,
``test(tau, alpha) -> (T,)`` and ``reference`` (the experts' own test accuracies).

The text suite, like ``subboost demo --suite text``, needs ``OPENBLAS_NUM_THREADS=1`` in the environment
(set before Python starts): without it a run was observed spinning for 25 minutes without progress on
2 shared cores, and finished in 2 minutes with it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import subboost as sb
from subboost.bench.config import SVD_BATCH_SIZE, SWEEP_BETAS

SUITES: tuple[str, ...] = ("vision", "text")
DEFAULT_CACHE = Path("~/.cache/subboost/bench")
# The paper's default cutoff (REFERENCE.md: grid {0, 0.01, 0.02}, default 0.01).
DEFAULT_BETA = 0.01


@dataclasses.dataclass(frozen=True)
class TextMergeSetting:
    """`MergeSetting`'s interface on the text suite (task vectors of the encoder subtree)."""

    config: Any
    model: Any
    suite: Any
    base: dict
    heads: dict
    experts: dict
    expert_test: np.ndarray
    num_tasks: int
    seed: int

    @functools.cached_property
    def _device(self):
        from subboost.text_bench.prototype_heads import take_tasks

        def split(s):
            s = s.take(self.num_tasks)
            return jnp.asarray(s.input_ids), jnp.asarray(s.attention_mask), jnp.asarray(s.labels)

        heads = jax.tree_util.tree_map(jnp.asarray, take_tasks(self.heads, self.num_tasks))
        return heads, split(self.suite.val), split(self.suite.test)

    @property
    def reference(self) -> np.ndarray:
        return self.expert_test[: self.num_tasks]

    @functools.cached_property
    def task_vectors(self) -> dict:
        from subboost.text_bench.pipeline import stacked_task_vectors

        return stacked_task_vectors(self.base["encoder"], self.experts, self.num_tasks)

    def merge(self, method: str) -> dict:
        kwargs = dict(self.config.method_kwargs.get(method, {}))
        if method == "dare":
            kwargs.setdefault("key", jax.random.key(self.seed))
        return sb.merge(self.task_vectors, method=method, **kwargs)

    def _sweep(self, tau, alphas, split) -> np.ndarray:
        from subboost.text_bench import evaluate as text_eval

        return text_eval.alpha_sweep(self.base, tau, alphas, *split, self._device[0], model=self.model,
                                     batch=self.config.eval_batch)

    def validation(self, tau, alphas) -> np.ndarray:
        return self._sweep(tau, alphas, self._device[1])

    def test(self, tau, alpha: float) -> np.ndarray:
        return self._sweep(tau, [alpha], self._device[2])[0]


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
    if suite not in SUITES:
        raise ValueError(f"--suite {suite!r}: choose one of {', '.join(SUITES)}.")
    start = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser()
    if suite == "vision":
        from subboost.bench import evaluate as bench_eval
        from subboost.bench.config import get_config
        from subboost.bench.pipeline import MergeSetting, load_or_train

        config = get_config(size)
        models = load_or_train(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
        heads = jax.tree_util.tree_map(jnp.asarray, models.heads)
        expert_test = np.asarray(bench_eval.expert_accuracies(
            models.experts, jnp.asarray(models.data.test.images), jnp.asarray(models.data.test.labels), heads,
            model=config.model, batch=config.eval_batch))

        def setting(num_tasks: int):
            return MergeSetting(config, models.data, models.base, models.heads, models.experts, expert_test,
                                num_tasks, seed)

        return Suite("vision", config, config.task_counts, config.alphas, config.sweep_betas, setting,
                     models.cache_dir, models.cache_hit, time.perf_counter() - start)

    from subboost.text_bench.config import get_config as get_text_config

    config = get_text_config(size)
    loaded, text_setting = load_text_settings(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    return Suite("text", config, config.task_counts, config.alphas, SWEEP_BETAS, text_setting,
                 Path(loaded["cache_dir"]), loaded["cache_hit"], time.perf_counter() - start)


def load_text_settings(config, *, seed: int, cache_dir: str | Path, progress: bool = True,
                       log: Callable[[str], None] = print) -> tuple[dict[str, Any], Callable[[int], TextMergeSetting]]:
    """The text suite's `load_or_train` output and its settings ``num_tasks -> TextMergeSetting``
    (the experts evaluated on test once, shared by every setting)."""
    from subboost.text_bench import evaluate as text_eval
    from subboost.text_bench.pipeline import load_or_train as load_or_train_text

    loaded = load_or_train_text(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    model, base, suite_data, heads, experts = (loaded[k] for k in ("model", "base", "suite", "heads", "experts"))
    if "embeddings" in experts:  # from the cache: the stacked full experts (as `run_text_benchmark` reads them)
        experts = experts["encoder"]
    test = suite_data.test
    expert_test = np.asarray(text_eval.expert_accuracies(
        base, experts, jnp.asarray(test.input_ids), jnp.asarray(test.attention_mask), jnp.asarray(test.labels),
        jax.tree_util.tree_map(jnp.asarray, heads), model=model, batch=config.eval_batch))

    def text_setting(num_tasks: int) -> TextMergeSetting:
        return TextMergeSetting(config, model, suite_data, base, heads, experts, expert_test, num_tasks, seed)

    return loaded, text_setting


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
