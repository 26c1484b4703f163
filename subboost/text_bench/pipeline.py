"""The text suite end to end: weights -> tasks -> heads -> experts -> merges -> report.

1. Convert the packaged all-MiniLM-L6-v2 weights (`weights.load_pretrained`), generate
   and tokenise the tasks (`generators`, `splits`).
2. Build the frozen prototype heads from the pretrained embeddings (`heads`) and
   fine-tune one expert per task (`finetune`); base, heads and experts are cached as
   orbax checkpoints under ``<cache dir>/<training key>`` (`subboost.bench.cache`).
3. The experts' regime (`regime`): relative task-vector norms, pairwise cosines,
   stable ranks, boosting cutoffs.
4. For each number of experts ``T`` in ``config.task_counts`` (the first ``T`` tasks):
   the pretrained model with heads, the experts, and every merge method of
   `subboost.available_methods()`, plain and with Subspace Boosting; alpha (and beta)
   chosen on validation (`subboost.bench.sweep.select`), accuracy reported on test,
   absolute and normalized. Merges combine the transformer blocks' task vectors only
   (the embeddings are frozen: their task vectors are exactly zero).
5. Write ``results.json``, ``results.md`` and two PNG plots to the output directory.

Nothing is tuned for any method: all share the grids, data, heads and experts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import subboost as sb
from subboost.bench.cache import ModelCache
from subboost.bench.label_noise import corrupt_labels
from subboost.bench.pipeline import methods_to_run, prepare_out_dir
from subboost.bench.sweep import select
from subboost.task_vectors import SubboostError
from subboost.text_bench import evaluate as text_eval
from subboost.bench.config import SVD_BATCH_SIZE
from subboost.text_bench.config import TextBenchConfig
from subboost.text_bench.splits import Split, TextSuite
from subboost.text_bench.finetune import finetune_experts
from subboost.text_bench.prototype_heads import build_heads, take_tasks
from subboost.text_bench.model import make_embedder
from subboost.text_bench.regime import boosted_stable_rank, cutoffs_from_spectra, regime, stable_rank_of
from subboost.text_bench.task_variants import build_task_suite
from subboost.text_bench.weights import load_pretrained, packaged_model_zip

RESULT_FILES = ("results.json", "results.md", "accuracy_vs_tasks.png", "stable_rank_vs_tasks.png")


@functools.partial(jax.jit, static_argnames="betas")
def boost_all(tau, betas: tuple[float, ...]):
    """``sb.subspace_boost(tau, beta)`` for every beta from one SVD per matrix; leaves get a leading beta axis.

    Boosting keeps the singular vectors and raises ``s_i`` to ``max(s_i, s_k(beta))``
    (`subboost.boosting.boost_singular_values`), so one ``U, s, Vh`` serves every beta.
    Same matrices and attention mode as `subspace_boost`'s defaults; non-matrix leaves
    are left as they are (tested against `subspace_boost` in tests/test_text_bench.py).
    """
    from subboost import linalg
    from subboost.boosting import boost_singular_values
    from subboost.tree import map_matrices

    def boost(x):  # (G, m, n) -> (G, B, m, n)
        u, s, vh = linalg.svd(x)
        out = [linalg.reconstruct(u, boost_singular_values(s, beta=b), vh).astype(x.dtype) for b in betas]
        return jnp.stack(out, axis=1)

    return map_matrices(boost, tau, non_matrix=lambda leaf: jnp.broadcast_to(leaf, (len(betas),) + leaf.shape),
                        batch_size=SVD_BATCH_SIZE)


def boost_candidates(tau, betas, spectra):
    """``({beta: boosted tau}, {beta: equivalent betas}, cutoffs)``; betas with identical cutoffs are boosted once.

    ``spectra``: ``sb.spectra(tau)`` (singular values of every matrix, computed once by the caller).
    """
    ks = cutoffs_from_spectra(spectra, betas)
    distinct, equivalent = [], {}
    for beta in betas:
        twin = next((b for b in distinct if np.array_equal(ks[b], ks[beta])), None)
        if twin is not None:
            equivalent[twin].append(beta)
            continue
        distinct.append(beta)
        equivalent[beta] = [beta]
    boosted = boost_all(tau, tuple(distinct))
    candidates = {b: jax.tree_util.tree_map(lambda x, i=i: x[i], boosted) for i, b in enumerate(distinct)}
    return candidates, equivalent, ks


def stacked_task_vectors(base_encoder: dict, experts: dict, num_tasks: int) -> dict:
    return sb.task_vectors(base_encoder, [jax.tree_util.tree_map(lambda x, t=t: x[t], experts) for t in range(num_tasks)])


def _device(split: Split, num_tasks: int):
    s = split.take(num_tasks)
    return jnp.asarray(s.input_ids), jnp.asarray(s.attention_mask), jnp.asarray(s.labels)


def evaluate_merges(config, model, suite, *, base, heads, experts, expert_test, num_tasks, seed, bar) -> dict[str, Any]:
    """Every merge method, plain and boosted, on the first ``num_tasks`` experts."""
    heads_t = jax.tree_util.tree_map(jnp.asarray, take_tasks(heads, num_tasks))
    val, test = _device(suite.val, num_tasks), _device(suite.test, num_tasks)
    tvs = stacked_task_vectors(base["encoder"], experts, num_tasks)
    reference = expert_test[:num_tasks]
    static = {"model": model, "batch": config.eval_batch}

    def evaluate(tau, alphas):
        return text_eval.alpha_sweep(base, tau, alphas, *val, heads_t, **static)

    def report(tau, selection, stable_rank) -> dict[str, Any]:
        acc = text_eval.alpha_sweep(base, tau, [selection.alpha], *test, heads_t, **static)[0]
        return {"alpha": selection.alpha, "beta": selection.candidate, "alpha_on_edge": selection.alpha_on_edge,
                "val_accuracy": selection.val_accuracy, "test_accuracy": acc.tolist(),
                "absolute": float(acc.mean()), "normalized": float(np.mean(acc / reference)),
                "stable_rank": stable_rank, "evaluations": selection.evaluations}

    results: dict[str, Any] = {}
    for method in methods_to_run(config):
        bar.set_postfix_str(f"{num_tasks} tasks: {method}")
        name, post = sb.post.split_composition(method)  # a method, or "method + post-merge operators"
        kwargs = dict(config.method_kwargs.get(name, {}))
        if name == "dare":
            kwargs.setdefault("key", jax.random.key(seed))
        fixed_alpha = config.fixed_alphas.get(method)
        try:
            tau = post(sb.merge(tvs, method=name, **kwargs), task_vectors=tvs, pretrained=base["encoder"])
        except SubboostError as err:
            results[method] = {"status": "n/a", "reason": str(err)}
            bar.update(1)
            continue
        spectra = sb.spectra(tau)
        plain = select(evaluate, {None: tau}, alphas=config.alphas, fixed_alpha=fixed_alpha)
        candidates, equivalent, ks = boost_candidates(tau, config.betas, spectra)
        boosted = select(evaluate, candidates, alphas=config.alphas, fixed_alpha=fixed_alpha)
        results[method] = {
            "status": "ok",
            "hyper_parameters": {k: v for k, v in config.method_kwargs.get(method, {}).items()},
            "fixed_alpha": fixed_alpha,
            "plain": report(tau, plain, stable_rank_of(spectra)),
            "boosted": {**report(candidates[boosted.candidate], boosted,
                                 boosted_stable_rank(spectra, boosted.candidate)),
                        "equivalent_betas": equivalent[boosted.candidate],
                        "mean_cutoff_index": float(ks[boosted.candidate].mean())},
        }
        bar.update(1)
    return results


def with_label_noise(suite: TextSuite, *, rate: float, seed: int) -> TextSuite:
    """``suite`` with its training labels corrupted (`subboost.bench.label_noise.corrupt_labels`, the vision
    suite's noise: deterministic in ``seed``); heads, validation and test unchanged. Rate 0 returns ``suite``."""
    if rate == 0.0:
        return suite
    train = dataclasses.replace(suite.train, labels=corrupt_labels(suite.train.labels, suite.num_classes, rate=rate,
                                                                   seed=seed))
    return dataclasses.replace(suite, train=train)


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
                             max_length=config.max_length, seed=seed)
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


def run_text_benchmark(
    config: TextBenchConfig,
    *,
    seed: int = 0,
    out_dir: str | Path = "results",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the text suite and writes its results; returns the ``results.json`` content."""
    from subboost.text_bench.figures import plot_accuracy, plot_stable_rank
    from subboost.text_bench.report import markdown_report

    total_start = time.perf_counter()
    out = prepare_out_dir(out_dir, overwrite=overwrite, result_files=RESULT_FILES)
    loaded = load_or_train(config, seed=seed, cache_dir=cache_dir if cache_dir is not None else out / "cache",
                           progress=progress, log=log)
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
    test = _device(suite.test, config.num_tasks)
    pretrained_test = np.asarray(text_eval.accuracies(base, *test, heads_j, **static))
    expert_test = text_eval.expert_accuracies(base, experts, *test, heads_j, **static)
    timings["eval_models_s"] = time.perf_counter() - start

    start = time.perf_counter()
    tvs = stacked_task_vectors(base["encoder"], experts, config.num_tasks)
    regime_figures = regime(base["encoder"], tvs, task_counts=config.task_counts, betas=config.betas)
    del tvs
    timings["regime_s"] = time.perf_counter() - start

    settings = []
    methods = methods_to_run(config)
    with tqdm(total=len(config.task_counts) * len(methods), desc="merging", unit="method",
              disable=not progress, leave=False) as bar:
        for num_tasks in config.task_counts:
            start = time.perf_counter()
            merged = evaluate_merges(config, model, suite, base=base, heads=heads, experts=experts,
                                     expert_test=expert_test, num_tasks=num_tasks, seed=seed, bar=bar)
            zs, ex = pretrained_test[:num_tasks], expert_test[:num_tasks]
            settings.append({
                "num_tasks": num_tasks,
                "tasks": [t.name for t in suite.tasks[:num_tasks]],
                "pretrained": {"absolute": float(zs.mean()), "normalized": float(np.mean(zs / ex))},
                "experts": {"absolute": float(ex.mean()), "normalized": 1.0},
                "methods": merged,
                "seconds": time.perf_counter() - start,
            })
            timings[f"merge_{num_tasks}_tasks_s"] = settings[-1]["seconds"]
            log(f"merged {num_tasks} experts with {len(methods)} methods in {settings[-1]['seconds']:.0f} s")

    results = {
        "benchmark": "subboost text suite (all-MiniLM-L6-v2 experts)",
        "suite": "text",
        "size": config.name,
        "seed": seed,
        "config": config.to_dict(),
        "model": model.to_dict(),
        "weights": str(packaged_model_zip()),
        "training_key": Path(loaded["cache_dir"]).name,
        "cache_dir": str(loaded["cache_dir"]),
        "cache_hit": loaded["cache_hit"],
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version()},
        "sequence_length": suite.length,
        "tasks": [{"name": t.name, "num_classes": t.num_classes, "description": t.description,
                   "example": suite.test.sentences[i][0]} for i, t in enumerate(suite.tasks)],
        "pretrained_test_accuracy": pretrained_test.tolist(),
        "expert_test_accuracy": expert_test.tolist(),
        "training": {"finetune_losses": meta.get("finetune_losses")},
        "regime": regime_figures,
        "settings": settings,
        "timings": timings,
    }
    start = time.perf_counter()
    plot_accuracy(results, out / "accuracy_vs_tasks.png")
    plot_stable_rank(results, out / "stable_rank_vs_tasks.png")
    timings["plots_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - total_start
    (out / "results.md").write_text(markdown_report(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
