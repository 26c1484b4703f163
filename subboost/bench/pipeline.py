"""The whole mini-benchmark, end to end: data -> base -> heads -> experts -> merges -> report.

1. Generate the tasks' splits and the pretraining mixture (`subboost.bench.generators`, `.splits`).
2. Pretrain the ViT CLIP-style on coarse captions (`.pretrain`), build the frozen
   zero-shot-like heads (`.centroid_heads`), fine-tune one expert per task (`.finetune`);
   base, heads and experts are cached as orbax checkpoints under
   ``<cache dir>/<training key>`` and reused when the training config matches (`.cache`).
3. For each number of experts ``T`` in ``config.task_counts`` (the first ``T``
   tasks): the pretrained model with heads, each expert on its own task, and
   every merge method in `subboost.available_methods()`, each without and with
   Subspace Boosting; alpha (and beta) chosen on validation (`.sweep`),
   accuracy reported on test, absolute and normalized (merged / expert
   accuracy per task, averaged over the ``T`` tasks); the mean stable rank of
   the merged task vector's matrices, plain and boosted.
4. At the largest task count, the boosting-strength sweep (`boost_sweep`); the
   regime figures (`.regime`: linear probe of the pretrained features, task-vector norms and cosines).
5. Write ``results.json``, ``results.md`` and three PNG plots to the output directory.

Nothing here is tuned for any merge method: all methods share the grids, the
data and the experts, and a method that cannot run on these shapes (e.g.
Iso-CTS with too many tasks for a small matrix) is reported as n/a with the
reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import subboost as sb
from subboost.bench.cache import ModelCache, training_key
from subboost.bench.config import SVD_BATCH_SIZE, BenchConfig
from subboost.bench.splits import SuiteData, build_suite, generate_split
from subboost.bench import evaluate as bench_eval
from subboost.bench.finetune import finetune_experts
from subboost.bench.centroid_heads import build_heads
from subboost.bench.model import make_encoder
from subboost.bench.base import load_shipped_base, pretraining_mixture
from subboost.bench.pretrain import PretrainResult, pretrain
from subboost.bench.regime import linear_probe_accuracy, task_vector_geometry
from subboost.bench.sweep import select
from subboost.bench.label_noise import with_label_noise
from subboost.bench.task_variants import task_set
from subboost.boosting import cutoff_index
from subboost.task_vectors import SubboostError

RESULT_FILES = ("results.json", "results.md", "accuracy_vs_tasks.png", "stable_rank_vs_tasks.png", "boost_sweep.png")
OUT_MARKER = ".subboost-demo"


def prepare_out_dir(out_dir: str | Path, *, overwrite: bool = False,
                    result_files: Sequence[str] = RESULT_FILES) -> Path:
    """Creates ``out_dir``; refuses a non-empty directory not written by the demo unless ``overwrite``.

    ``result_files`` (the files the caller's suite writes) are never replaced in a folder that the demo
    did not write, even with ``overwrite``.
    """
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"--out {out} exists and is not a directory.")
    clashing = [name for name in result_files if (out / name).exists()] if out.is_dir() else []
    if clashing and not (out / OUT_MARKER).exists():  # --overwrite replaces only what the demo wrote
        raise FileExistsError(
            f"--out {out} holds {', '.join(clashing)}, which `subboost demo` did not write (no {OUT_MARKER}); "
            "refusing to replace them even with --overwrite. Choose another --out."
        )
    if out.exists() and any(out.iterdir()) and not (out / OUT_MARKER).exists() and not overwrite:
        raise FileExistsError(
            f"--out {out} is a non-empty directory that `subboost demo` did not create; "
            "choose another --out or pass --overwrite (the demo then replaces only its own result files)."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_MARKER).write_text("written by `subboost demo`; its results are overwritten by the next run\n")
    return out


def methods_to_run(config: Any) -> tuple[str, ...]:
    """``config.methods`` (any suite config), checked against the registry; ``None``: every method and
    `DEFAULT_COMPOSITIONS` (``"method + post-merge operators"``, `subboost.post_merge.split_composition`)."""
    from subboost.bench.config import DEFAULT_COMPOSITIONS

    available = sb.available_methods()
    if config.methods is None:
        return tuple(available) + DEFAULT_COMPOSITIONS
    unknown = [m for m in config.methods if sb.post.split_composition(m)[0] not in available]
    if unknown:
        raise ValueError(f"{type(config).__name__}.methods: unknown merge method(s) {unknown}; "
                         f"available: {', '.join(available)}.")
    return tuple(config.methods)


def method_kwargs(config: BenchConfig, method: str, seed: int) -> dict[str, Any]:
    kwargs = dict(config.method_kwargs.get(method, {}))
    if method == "dare":
        kwargs.setdefault("key", jax.random.key(seed))
    return kwargs


def mean_stable_rank(tau: dict) -> float:
    """Mean stable rank over every matrix of a task vector (`subboost.stable_rank`)."""
    values = [np.ravel(np.asarray(v)) for v in sb.stable_rank(tau).values()]
    return float(np.mean(np.concatenate(values)))


def cutoff_indices(tau: dict, betas) -> dict[float, np.ndarray]:
    """Per beta, the boosting cutoff index ``k`` of every matrix (cumsum mode, as `subspace_boost`).

    ``k = 0`` means boosting raises every singular value to ``s_0`` (a flat spectrum).
    """
    spectra = [jnp.asarray(s) for s in sb.spectra(tau).values()]
    return {beta: np.concatenate([np.ravel(np.asarray(cutoff_index(s, beta=beta))) for s in spectra]) for beta in betas}


def boost_candidates(tau: dict, betas) -> tuple[dict[float, dict], dict[float, list[float]], dict[float, np.ndarray]]:
    """Boosted task vectors for the distinct betas.

    Betas whose cutoff indices coincide on every matrix give the *same* boosted
    task vector, so only the first of them is boosted and evaluated.

    Returns:
      ``(candidates, equivalent, cutoffs)``: ``{beta: boosted tau}`` for the first
      beta of each group, ``{that beta: every beta of its group}``, and the
      cutoff indices per beta.
    """
    cutoffs = cutoff_indices(tau, betas)
    candidates: dict[float, dict] = {}
    equivalent: dict[float, list[float]] = {}
    for beta in betas:
        twin = next((b for b in candidates if np.array_equal(cutoffs[b], cutoffs[beta])), None)
        if twin is not None:
            equivalent[twin].append(beta)
            continue
        candidates[beta] = sb.subspace_boost(tau, beta=beta, batch_size=SVD_BATCH_SIZE)
        equivalent[beta] = [beta]
    return candidates, equivalent, cutoffs


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


def task_vectors_of(base: dict, experts: dict, num_tasks: int) -> dict:
    """Stacked task vectors of the first ``num_tasks`` experts (``experts`` stacked on a leading axis).

    `sb.task_vectors` runs on every expert and the first ``num_tasks`` rows are taken on the host, so
    one compiled program serves every task count (the subtraction is element-wise: same values).
    """
    count = jax.tree_util.tree_leaves(experts)[0].shape[0]
    if not 0 < num_tasks <= count:
        raise ValueError(f"task_vectors_of: num_tasks={num_tasks}, but there are {count} experts.")
    experts = jax.tree_util.tree_map(np.asarray, experts)
    every = sb.task_vectors(base, [jax.tree_util.tree_map(lambda x, t=t: x[t], experts) for t in range(count)])
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:num_tasks], every)


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


@dataclasses.dataclass(frozen=True)
class MergeSetting:
    """Everything the merges at one task count share: the trained models and the first ``num_tasks`` tasks.

    `evaluate_merges` and `boost_sweep` take one of these instead of a long keyword list.

    Attributes:
      config: the benchmark size; data: every task's splits.
      base, heads, experts: the trained models (experts stacked over all tasks).
      expert_test: each expert's test accuracy on its own task, ``(num_all_tasks,)``.
      num_tasks: how many experts (the first ones) are merged.
      seed: the run seed (DARE's key).
    """

    config: BenchConfig
    data: SuiteData
    base: dict
    heads: dict
    experts: dict
    expert_test: np.ndarray
    num_tasks: int
    seed: int

    @functools.cached_property
    def _device_tasks(self) -> tuple[list[tuple], list[tuple]]:
        """Validation and test splits as ``[(images, labels, head), ...]``, one entry per merged task."""
        def per_task(split) -> list[tuple]:
            # `jax.device_put` copies without compiling (`jnp.asarray` compiles a copy per new shape).
            return [jax.device_put((split.images[t], split.labels[t],
                                    jax.tree_util.tree_map(lambda h, t=t: np.asarray(h)[t], self.heads)))
                    for t in range(self.num_tasks)]

        return per_task(self.data.val), per_task(self.data.test)

    @property
    def reference(self) -> np.ndarray:
        """The merged experts' own test accuracies (denominators of the normalized accuracy)."""
        return self.expert_test[: self.num_tasks]

    @functools.cached_property
    def task_vectors(self) -> dict:
        """The first ``num_tasks`` experts' task vectors, stacked (computed once)."""
        return task_vectors_of(self.base, self.experts, self.num_tasks)

    def merge(self, method: str) -> dict:
        """The merged task vector of a method or a composition ``"method + op:k=v + ..."``."""
        name, post = sb.post.split_composition(method)
        tau = sb.merge(self.task_vectors, method=name, **method_kwargs(self.config, name, self.seed))
        return post(tau, task_vectors=self.task_vectors, pretrained=self.base)

    def _sweep(self, tau, alphas, tasks) -> np.ndarray:
        return bench_eval.sweep_alphas_by_task(self.base, tau, alphas, tasks, model=self.config.model,
                                               batch=self.config.eval_batch)

    def validation(self, tau, alphas) -> np.ndarray:
        """``(A, T)`` validation accuracies of ``theta_0 + alpha tau`` (the `select` evaluate function)."""
        return self._sweep(tau, alphas, self._device_tasks[0])

    def test(self, tau, alpha: float) -> np.ndarray:
        """``(T,)`` test accuracies of ``theta_0 + alpha tau``."""
        return self._sweep(tau, [alpha], self._device_tasks[1])[0]


def evaluate_merges(setting: MergeSetting, *, bar: tqdm) -> dict[str, Any]:
    """Every merge method, plain and boosted, on the first ``setting.num_tasks`` experts."""
    config, num_tasks, reference = setting.config, setting.num_tasks, setting.reference

    def report(tau, selection) -> dict[str, Any]:
        test = setting.test(tau, selection.alpha)
        return {
            "alpha": selection.alpha,
            "beta": selection.candidate,
            "alpha_on_edge": selection.alpha_on_edge,
            "val_accuracy": selection.val_accuracy,
            "test_accuracy": test.tolist(),
            "absolute": float(test.mean()),
            "normalized": float(np.mean(test / reference)),
            "stable_rank": mean_stable_rank(tau),
            "evaluations": selection.evaluations,
        }

    results: dict[str, Any] = {}
    for method in methods_to_run(config):
        bar.set_postfix_str(f"{num_tasks} tasks: {method}")
        fixed_alpha = config.fixed_alphas.get(method)
        try:
            tau = setting.merge(method)
        except SubboostError as err:
            results[method] = {"status": "n/a", "reason": str(err)}
            bar.update(1)
            continue
        plain = select(setting.validation, {None: tau}, alphas=config.alphas, fixed_alpha=fixed_alpha)
        boosted_candidates, equivalent, cutoffs = boost_candidates(tau, config.betas)
        boosted = select(setting.validation, boosted_candidates, alphas=config.alphas, fixed_alpha=fixed_alpha)
        results[method] = {
            "status": "ok",
            "hyper_parameters": {k: v for k, v in config.method_kwargs.get(method, {}).items()},
            "fixed_alpha": fixed_alpha,
            "plain": report(tau, plain),
            "boosted": report(boosted_candidates[boosted.candidate], boosted),
        }
        results[method]["boosted"].update(
            equivalent_betas=equivalent[boosted.candidate],
            mean_cutoff_index=float(cutoffs[boosted.candidate].mean()),
        )
        bar.update(1)
    return results


def boost_sweep(setting: MergeSetting, *, progress: bool = True) -> dict[str, Any]:
    """Accuracy against boosting strength: each method of ``config.sweep_methods`` boosted at every beta
    of ``config.sweep_betas`` (beta = 1 leaves the spectrum as it is), alpha tuned on validation per beta.
    Betas with the same cutoff index on every matrix give the same boosted task vector and share one row.

    Returns ``{method: [{"beta", "alpha", "alpha_on_edge", "val_accuracy", "absolute", "normalized",
    "mean_cutoff_index", "stable_rank"}, ...]}`` (one entry per beta, in grid order).
    """
    config, reference = setting.config, setting.reference
    methods = [m for m in config.sweep_methods if m in methods_to_run(config)]
    sweep: dict[str, Any] = {}
    with tqdm(total=len(methods) * len(config.sweep_betas), desc=f"boosting sweep ({setting.num_tasks} tasks)",
              unit="beta", disable=not progress, leave=False) as bar:
        for method in methods:
            tau = setting.merge(method)
            cutoffs = cutoff_indices(tau, config.sweep_betas)
            rows = []
            for beta in config.sweep_betas:
                twin = next((r for r in rows if np.array_equal(cutoffs[r["beta"]], cutoffs[beta])), None)
                if twin is not None:  # same cutoff on every matrix: the same boosted task vector
                    rows.append({**twin, "beta": beta})
                    bar.update(1)
                    continue
                boosted = sb.subspace_boost(tau, beta=beta, batch_size=SVD_BATCH_SIZE)
                choice = select(setting.validation, {beta: boosted}, alphas=config.alphas)
                test = setting.test(boosted, choice.alpha)
                rows.append({
                    "beta": beta,
                    "alpha": choice.alpha,
                    "alpha_on_edge": choice.alpha_on_edge,
                    "val_accuracy": choice.val_accuracy,
                    "absolute": float(test.mean()),
                    "normalized": float(np.mean(test / reference)),
                    "mean_cutoff_index": float(cutoffs[beta].mean()),
                    "stable_rank": mean_stable_rank(boosted),
                })
                bar.update(1)
            sweep[method] = rows
    return sweep


def run_benchmark(
    config: BenchConfig,
    *,
    seed: int = 0,
    out_dir: str | Path = "results",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the benchmark and writes its results; returns the ``results.json`` content.

    Args:
      config: the benchmark size (`subboost.bench.config.get_config`).
      seed: run seed (data, initialisation, batches, DARE); the same seed gives the same tables.
      out_dir: where results go (see `prepare_out_dir`).
      cache_dir: model cache root (default ``<out_dir>/cache``).
      overwrite: allow writing into a non-empty directory the demo did not create.
      progress: show progress bars.
      log: receives one-line progress messages.
    """
    from subboost.bench.figures import plot_accuracy, plot_boost_sweep, plot_stable_rank
    from subboost.bench.report import markdown_report

    total_start = time.perf_counter()
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    timings: dict[str, float] = {}
    tasks = task_set(config.task_set)[: config.num_tasks]

    models = load_or_train(config, seed=seed, cache_dir=cache_dir if cache_dir is not None else out / "cache",
                           progress=progress, log=log)
    data, base, heads, experts, meta = models.data, models.base, models.heads, models.experts, models.meta
    timings.update(models.timings)
    key, cache_hit = models.cache_dir.name, models.cache_hit  # the cache entry is named by the training key

    start = time.perf_counter()
    static = {"model": config.model, "batch": config.eval_batch}
    heads_j, test_images, test_labels = jax.device_put((heads, data.test.images, data.test.labels))
    pretrained_test = np.asarray(bench_eval.accuracies(base, test_images, test_labels, heads_j, **static))
    expert_test = np.asarray(bench_eval.expert_accuracies(experts, test_images, test_labels, heads_j, **static))
    timings["eval_models_s"] = time.perf_counter() - start

    settings = []
    methods = methods_to_run(config)
    with tqdm(total=len(config.task_counts) * len(methods), desc="merging", unit="method",
              disable=not progress, leave=False) as bar:
        for num_tasks in config.task_counts:
            start = time.perf_counter()
            merged = evaluate_merges(MergeSetting(config, data, base, heads, experts, expert_test, num_tasks, seed),
                                     bar=bar)
            zs, ex = pretrained_test[:num_tasks], expert_test[:num_tasks]
            settings.append({
                "num_tasks": num_tasks,
                "tasks": [t.name for t in tasks[:num_tasks]],
                "pretrained": {"absolute": float(zs.mean()), "normalized": float(np.mean(zs / ex))},
                "experts": {"absolute": float(ex.mean()), "normalized": 1.0},
                "methods": merged,
                "seconds": time.perf_counter() - start,
            })
            timings[f"merge_{num_tasks}_tasks_s"] = settings[-1]["seconds"]

    start = time.perf_counter()
    largest = config.task_counts[-1]
    sweep = boost_sweep(MergeSetting(config, data, base, heads, experts, expert_test, largest, seed),
                        progress=progress)
    timings["boost_sweep_s"] = time.perf_counter() - start
    start = time.perf_counter()
    probe = linear_probe_accuracy(base, data, model=config.model, batch=config.eval_batch, seed=seed)
    regime = {
        "linear_probe_accuracy": probe.tolist(),
        "probe_over_expert": float(probe.mean() / expert_test.mean()),
        **task_vector_geometry(base, experts),
    }
    timings["regime_s"] = time.perf_counter() - start

    results = {
        "benchmark": "subboost offline mini-benchmark",
        "size": config.name,
        "seed": seed,
        "config": config.to_dict(),
        "training_key": key,
        "cache_dir": str(models.cache_dir),
        "cache_hit": cache_hit,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version()},
        "tasks": [{"name": t.name, "num_classes": t.num_classes, "noise": t.noise, "description": t.description}
                  for t in tasks],
        "pretrained_test_accuracy": pretrained_test.tolist(),
        "expert_test_accuracy": expert_test.tolist(),
        "training": {k: v for k, v in meta.items() if k != "timings"},
        "settings": settings,
        "regime": regime,
        "boost_sweep": {"num_tasks": largest, "betas": list(config.sweep_betas), "methods": sweep,
                        "reference": {m: settings[-1]["methods"][m]["plain"] for m in ("iso_c",)
                                      if settings[-1]["methods"].get(m, {}).get("status") == "ok"}},
        "timings": timings,
    }
    start = time.perf_counter()
    plot_accuracy(results, out / "accuracy_vs_tasks.png")
    plot_stable_rank(results, out / "stable_rank_vs_tasks.png")
    plot_boost_sweep(results, out / "boost_sweep.png")
    timings["plots_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - total_start
    (out / "results.md").write_text(markdown_report(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
