"""The vision suite: generated image tasks, a small CLIP-style ViT, frozen heads, fine-tuned experts.

`prepare` is what the suite hands the harness (`subboost.bench.pipeline.run_benchmark`):

1. Generate the tasks' splits (`subboost.bench.suites.vision.generators`, `.splits`).
2. Load the shipped pretrained base (or pretrain the ViT CLIP-style on coarse captions,
   `.pretrain`), build the frozen zero-shot-like heads (`.centroid_heads`), fine-tune one
   expert per task (`.finetune`); base, heads and experts are cached as orbax checkpoints under
   ``<cache dir>/<training key>`` and reused when the training config matches
   (`subboost.bench.cache`, `.keys`).
3. Evaluate the pretrained model with heads and each expert on test; hand out the evaluator of
   merged task vectors (one compiled program per split size, shared by every task count) and
   the regime figures (`.regime`: linear probe of the pretrained features, task-vector norms
   and cosines).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.bench.cache import ModelCache
from subboost.bench.label_noise import with_label_noise
from subboost.bench.pipeline import TrainedSuite, task_vectors_of
from subboost.bench.regime import task_vector_geometry
from subboost.bench.suites.vision import evaluate as bench_eval
from subboost.bench.suites.vision.base import load_shipped_base, pretraining_mixture
from subboost.bench.suites.vision.centroid_heads import build_heads
from subboost.bench.suites.vision.config import BenchConfig
from subboost.bench.suites.vision.finetune import finetune_experts
from subboost.bench.suites.vision.keys import training_key
from subboost.bench.suites.vision.model import make_encoder
from subboost.bench.suites.vision.pretrain import PretrainResult, pretrain
from subboost.bench.suites.vision.regime import linear_probe_accuracy
from subboost.bench.suites.vision.splits import SuiteData, build_suite, generate_split
from subboost.bench.suites.vision.task_variants import task_set


def head_draw(config: BenchConfig, data: SuiteData, *, seed: int) -> tuple[int, SuiteData]:
    """The seed and the suite the frozen heads' examples are drawn from.

    ``config.head_seed`` (the shipped base's own seed) when set, so every run seed evaluates the same
    pretrained model with the same heads; else the run seed and its own data. Only the training split of
    ``head_seed`` is generated: `few_shot_examples` reads nothing else.
    """
    if config.head_seed is None or config.head_seed == seed:
        return seed, data
    train = generate_split(data.tasks, "train", config.train_per_task, seed=config.head_seed,
                           style=config.domain_style)
    return config.head_seed, dataclasses.replace(data, train=train)


def train_models(config: BenchConfig, data: SuiteData, *, seed: int, progress: bool, log: Callable[[str], None]):
    """Pretrains the base, builds the heads and fine-tunes the experts (timed)."""
    timings = {}
    if config.base is not None:
        start = time.perf_counter()
        encoder, scale = load_shipped_base(config.base)
        pretrained = PretrainResult(encoder, scale, ())
        timings["base_load_s"] = time.perf_counter() - start
        log(f"loaded the shipped pretrained base {config.base!r} (logit scale {scale:.1f})")
    else:
        start = time.perf_counter()
        mixture = pretraining_mixture(config, data.tasks, seed=seed, progress=progress)
        timings["pretraining_data_s"] = time.perf_counter() - start
        start = time.perf_counter()
        pretrained = pretrain(config, mixture, seed=seed, progress=progress)
        timings["pretrain_s"] = time.perf_counter() - start
        log(f"pretrained {config.pretrain_steps} steps in {timings['pretrain_s']:.0f} s "
            f"(loss {pretrained.losses[0]:.3f} -> {pretrained.losses[-1]:.3f}, logit scale {pretrained.logit_scale:.1f})")
    start = time.perf_counter()
    head_seed, head_data = head_draw(config, data, seed=seed)
    heads = build_heads(make_encoder(config.model), pretrained.encoder, head_data, shots=config.head_shots,
                        logit_scale=pretrained.logit_scale, seed=head_seed)
    # Label noise reaches fine-tuning only: the heads above were built from clean labels.
    finetune_data = with_label_noise(data, rate=config.finetune_label_noise, seed=seed)
    experts, losses = finetune_experts(config, pretrained.encoder, finetune_data, heads, seed=seed, progress=progress)
    experts = jax.block_until_ready(experts)
    timings["finetune_s"] = time.perf_counter() - start
    log(f"fine-tuned {data.train.num_tasks} experts x {config.finetune_steps} steps in {timings['finetune_s']:.0f} s "
        f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    meta = {
        "logit_scale": pretrained.logit_scale,
        "pretrain_losses": list(pretrained.losses),
        "finetune_losses": losses,
        "timings": timings,
    }
    return jax.device_get(pretrained.encoder), jax.device_get(heads), jax.device_get(experts), meta


@dataclasses.dataclass
class BenchModels:
    """A benchmark size's data and trained models (from the cache, or trained and cached now).

    ``experts`` holds the encoders stacked on a leading task axis (expert ``t``
    at index ``t``); `task_vectors` gives the stacked task vectors. The cache
    entry ``cache_dir`` is named by the config's training key.
    """

    config: BenchConfig
    data: SuiteData
    base: dict
    heads: dict
    experts: dict
    meta: dict[str, Any]
    cache_dir: Path
    cache_hit: bool
    timings: dict[str, float]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.data.tasks]

    def task_vectors(self, num_tasks: int | None = None) -> dict:
        """``sb.task_vectors(base, experts)`` of the first ``num_tasks`` experts (all by default)."""
        return task_vectors_of(self.base, self.experts, self.config.num_tasks if num_tasks is None else num_tasks)


def load_or_train(
    config: BenchConfig,
    *,
    seed: int = 0,
    cache_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BenchModels:
    """Generates the data, then loads base, heads and experts from ``cache_dir`` or trains and caches them.

    The cache entry is ``cache_dir/<training_key(config, seed)>``: any change to a
    training setting or to the generators' and trainers' source trains anew.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tasks = task_set(config.task_set)[: config.num_tasks]
    data = build_suite(tasks, train=config.train_per_task, val=config.val_per_task, test=config.test_per_task,
                       seed=seed, style=config.domain_style, progress=progress)
    timings["data_s"] = time.perf_counter() - start
    cache = ModelCache(Path(cache_dir).expanduser(), training_key(config, seed))
    if cache.complete():
        start = time.perf_counter()
        base, heads, experts, meta = cache.load()
        timings["cache_load_s"] = time.perf_counter() - start
        log(f"reusing trained base and {config.num_tasks} experts from {cache.dir}")
        return BenchModels(config, data, base, heads, experts, meta, cache.dir, True, timings)
    base, heads, experts, meta = train_models(config, data, seed=seed, progress=progress, log=log)
    start = time.perf_counter()
    cache.save(base=base, heads=heads, experts=experts, task_names=[t.name for t in tasks], meta=meta)
    timings["cache_save_s"] = time.perf_counter() - start
    timings.update(meta["timings"])
    log(f"cached the trained models in {cache.dir}")
    return BenchModels(config, data, base, heads, experts, meta, cache.dir, False, timings)


def split_evaluator(models: BenchModels, num_tasks: int) -> Callable[[Any, Sequence[float], str], np.ndarray]:
    """``(tau, alphas, split) -> (A, num_tasks)`` accuracies of ``theta_0 + alpha tau`` on the first tasks.

    Each task is evaluated by its own call (`bench_eval.sweep_alphas_by_task`), whose program depends on
    the split's size only: the merges at every task count share the validation and the test program.
    """
    def per_task(split) -> list[tuple]:
        # `jax.device_put` copies without compiling (`jnp.asarray` compiles a copy per new shape).
        return [jax.device_put((split.images[t], split.labels[t],
                                jax.tree_util.tree_map(lambda h, t=t: np.asarray(h)[t], models.heads)))
                for t in range(num_tasks)]

    tasks = {"val": per_task(models.data.val), "test": per_task(models.data.test)}

    def evaluate(tau, alphas: Sequence[float], split: str) -> np.ndarray:
        return bench_eval.sweep_alphas_by_task(models.base, tau, alphas, tasks[split], model=models.config.model,
                                               batch=models.config.eval_batch)

    return evaluate


def prepare(config: BenchConfig, *, seed: int, cache_dir: str | Path, progress: bool = True,
            log: Callable[[str], None] = print) -> TrainedSuite:
    """The suite's trained models for the harness (`subboost.bench.suites.Suite.prepare`)."""
    models = load_or_train(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    timings = dict(models.timings)
    start = time.perf_counter()
    static = {"model": config.model, "batch": config.eval_batch}
    heads, test_images, test_labels = jax.device_put((models.heads, models.data.test.images, models.data.test.labels))
    pretrained_test = np.asarray(bench_eval.accuracies(models.base, test_images, test_labels, heads, **static))
    expert_test = np.asarray(bench_eval.expert_accuracies(models.experts, test_images, test_labels, heads, **static))
    timings["eval_models_s"] = time.perf_counter() - start

    def regime() -> dict[str, Any]:
        probe = linear_probe_accuracy(models.base, models.data, model=config.model, batch=config.eval_batch, seed=seed)
        return {"linear_probe_accuracy": probe.tolist(), "probe_over_expert": float(probe.mean() / expert_test.mean()),
                **task_vector_geometry(models.base, models.experts)}

    tasks = [{"name": t.name, "num_classes": t.num_classes, "noise": t.noise, "description": t.description}
             for t in models.data.tasks]
    fields = {"benchmark": "subboost offline mini-benchmark",
              "training": {k: v for k, v in models.meta.items() if k != "timings"}}
    return TrainedSuite(config, seed, models.base, models.experts, lambda n: split_evaluator(models, n),
                        pretrained_test, expert_test, tasks, regime, models.cache_dir, models.cache_hit, timings, fields)
