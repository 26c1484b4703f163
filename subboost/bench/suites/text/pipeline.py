"""The text suite: experts fine-tuned from all-MiniLM-L6-v2 on generated sentence tasks.

`prepare` is what the suite hands the harness (`subboost.bench.pipeline.run_benchmark`):

1. Convert the packaged all-MiniLM-L6-v2 weights (`weights.load_pretrained`), generate
   and tokenise the tasks (`generators`, `splits`).
2. Build the frozen prototype heads from the pretrained embeddings (`prototype_heads`) and
   fine-tune one expert per task (`finetune`); base, heads and experts are cached as
   orbax checkpoints under ``<cache dir>/<training key>`` (`subboost.bench.cache`).
3. Evaluate the pretrained model with heads and each expert on test; hand out the evaluator of
   merged task vectors and the regime figures (`regime`). Merges combine the transformer
   blocks' task vectors only (the embeddings are frozen: their task vectors are exactly zero).
"""

from __future__ import annotations

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
from subboost.bench.suites.text import evaluate as text_eval
from subboost.bench.suites.text.config import TextBenchConfig
from subboost.bench.suites.text.finetune import finetune_experts
from subboost.bench.suites.text.model import make_embedder
from subboost.bench.suites.text.prototype_heads import build_heads, take_tasks
from subboost.bench.suites.text.regime import regime
from subboost.bench.suites.text.splits import Split
from subboost.bench.suites.text.task_variants import build_task_suite
from subboost.bench.suites.text.weights import load_pretrained, packaged_model_zip


def on_device(split: Split, num_tasks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(input_ids, attention_mask, labels)`` of the first ``num_tasks`` tasks, on the device."""
    s = split.take(num_tasks)
    return jnp.asarray(s.input_ids), jnp.asarray(s.attention_mask), jnp.asarray(s.labels)


def load_or_train(config: TextBenchConfig, *, seed: int, cache_dir: str | Path, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Weights, suite, heads and experts: from ``cache_dir`` when the training key matches, else trained and cached."""
    from subboost.convert.common import sha256_file

    timings: dict[str, float] = {}
    start = time.perf_counter()
    weights = packaged_model_zip()
    model, base, tokenizer = load_pretrained(weights, layers=config.layers)
    timings["convert_s"] = time.perf_counter() - start
    start = time.perf_counter()
    suite = build_task_suite(config.task_set, config.num_tasks, tokenizer, train=config.train_per_task,
                             val=config.val_per_task, test=config.test_per_task, head_shots=config.head_shots,
                             max_length=config.max_length, seed=seed,
                             **({"data_dir": config.data_dir} if config.task_set == "real" else {}))
    timings["data_s"] = time.perf_counter() - start
    cache = ModelCache(Path(cache_dir).expanduser(), config.training_key(seed, sha256_file(weights)))
    out = {"model": model, "base": base, "suite": suite, "cache_dir": cache.dir, "timings": timings}
    if cache.complete():
        start = time.perf_counter()
        _, heads, experts, meta = cache.load()
        timings["cache_load_s"] = time.perf_counter() - start
        log(f"reusing the heads and {config.num_tasks} experts cached in {cache.dir}")
        return {**out, "heads": heads, "experts": experts, "meta": meta, "cache_hit": True}
    start = time.perf_counter()
    heads = jax.device_get(build_heads(make_embedder(model), base, suite, shots=config.head_shots,
                                       logit_scale=config.logit_scale))
    experts, losses = finetune_experts(config, model, base, with_label_noise(suite, rate=config.finetune_label_noise,
                                                                             seed=seed), heads, seed=seed,
                                       progress=progress)
    timings["finetune_s"] = time.perf_counter() - start
    log(f"fine-tuned {config.num_tasks} experts x {config.finetune_steps} steps in {timings['finetune_s']:.0f} s "
        f"(mean loss {np.mean([l[0] for l in losses]):.3f} -> {np.mean([l[-1] for l in losses]):.3f})")
    meta = {"finetune_losses": losses, "timings": dict(timings)}
    # Experts are saved whole (embeddings included), so `subboost merge` reads them directly.
    full = {"embeddings": jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (config.num_tasks,) + x.shape),
                                                 base["embeddings"]), "encoder": experts}
    start = time.perf_counter()
    cache.save(base=base, heads=heads, experts=full, task_names=[t.name for t in suite.tasks], meta=meta)
    timings["cache_save_s"] = time.perf_counter() - start
    log(f"cached base, heads and experts in {cache.dir}")
    return {**out, "heads": heads, "experts": experts, "meta": meta, "cache_hit": False}


def split_evaluator(loaded: dict[str, Any], experts_heads: dict, num_tasks: int, *, batch: int
                    ) -> Callable[[Any, Sequence[float], str], np.ndarray]:
    """``(tau, alphas, split) -> (A, num_tasks)`` accuracies of ``theta_0 + alpha tau`` on the first tasks
    (``tau``: the ``encoder`` subtree's task vector)."""
    suite = loaded["suite"]
    heads = jax.tree_util.tree_map(jnp.asarray, take_tasks(experts_heads, num_tasks))
    splits = {"val": on_device(suite.val, num_tasks), "test": on_device(suite.test, num_tasks)}

    def evaluate(tau, alphas: Sequence[float], split: str) -> np.ndarray:
        return text_eval.alpha_sweep(loaded["base"], tau, alphas, *splits[split], heads, model=loaded["model"],
                                     batch=batch)

    return evaluate


def prepare(config: TextBenchConfig, *, seed: int, cache_dir: str | Path, progress: bool = True,
            log: Callable[[str], None] = print) -> TrainedSuite:
    """The suite's trained models for the harness (`subboost.bench.suites.Suite.prepare`)."""
    loaded = load_or_train(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    model, base, suite, heads, meta = loaded["model"], loaded["base"], loaded["suite"], loaded["heads"], loaded["meta"]
    experts = loaded["experts"]
    if "embeddings" in experts:  # from the cache: the stacked full experts
        experts = experts["encoder"]
    timings = dict(loaded["timings"])
    if not loaded["cache_hit"]:
        timings.update(meta.get("timings", {}))

    start = time.perf_counter()
    static = {"model": model, "batch": config.eval_batch}
    heads_j = jax.tree_util.tree_map(jnp.asarray, heads)
    test = on_device(suite.test, config.num_tasks)
    pretrained_test = np.asarray(text_eval.accuracies(base, *test, heads_j, **static))
    expert_test = text_eval.expert_accuracies(base, experts, *test, heads_j, **static)
    timings["eval_models_s"] = time.perf_counter() - start

    def regime_figures() -> dict[str, Any]:
        tvs = task_vectors_of(base["encoder"], experts, config.num_tasks)
        return regime(base["encoder"], tvs, task_counts=config.task_counts, betas=config.betas)

    tasks = [{"name": t.name, "num_classes": t.num_classes, "description": t.description,
              "example": suite.test.sentences[i][0]} for i, t in enumerate(suite.tasks)]
    fields = {"benchmark": "subboost text suite (all-MiniLM-L6-v2 experts)", "model": model.to_dict(),
              "weights": str(packaged_model_zip()), "sequence_length": suite.length,
              "training": {"finetune_losses": meta.get("finetune_losses")}}
    return TrainedSuite(config, seed, base["encoder"], experts,
                        lambda n: split_evaluator(loaded, heads, n, batch=config.eval_batch),
                        pretrained_test, expert_test, tasks, regime_figures, Path(loaded["cache_dir"]),
                        loaded["cache_hit"], timings, fields)
