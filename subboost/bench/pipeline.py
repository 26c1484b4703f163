"""The benchmark harness, shared by every suite: merges, selection, boosting sweep, report, output folder.

A suite (`subboost.bench.suites`) prepares its trained models as a `TrainedSuite`: the base and
the experts (stacked on a leading task axis), their test accuracies, and an evaluator of
``theta_0 + alpha tau`` on the validation and test splits. From there the harness runs the same
story for every suite:

1. For each number of experts ``T`` in ``config.task_counts`` (the first ``T`` tasks): every
   merge method in `subboost.available_methods()` (or ``config.methods``), plain and with
   Subspace Boosting; alpha (and beta) chosen on validation (`subboost.bench.sweep.select`),
   accuracy reported on test, absolute and normalized (merged / expert accuracy per task,
   averaged over the ``T`` tasks); the mean stable rank of the merged task vector's matrices,
   plain and boosted. Betas whose cutoffs agree on every matrix give one boosted task vector
   (`subboost.boosting.equivalent_betas`), boosted once by `subboost.subspace_boost_sweep`.
2. At the largest task count, the boosting-strength sweep (`boost_sweep`) when the config names
   ``sweep_methods``; the suite's regime figures.
3. ``results.json``, ``results.md`` and the PNG plots in the output directory.

Nothing here is tuned for any merge method: all methods share the grids, the data and the
experts, and a method that cannot run on these shapes (e.g. Iso-CTS with too many tasks for a
small matrix) is reported as n/a with the reason.
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
from subboost.boosting import boost_singular_values, cutoff_index, equivalent_betas
from subboost.bench.settings import SVD_BATCH_SIZE
from subboost.bench.sweep import select
from subboost.errors import SubboostError
from subboost.spectra import stable_rank_from_singular_values

RESULT_FILES = ("results.json", "results.md", "accuracy_vs_tasks.png", "stable_rank_vs_tasks.png", "boost_sweep.png")
OUT_MARKER = ".subboost-demo"

# evaluate(task vector, alphas, split) -> (A, T) accuracies on the first T tasks' "val" or "test" split
Evaluate = Callable[[Any, Sequence[float], str], np.ndarray]


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
    """``config.methods`` (any suite config), checked against the registry; ``None``: every method."""
    available = sb.available_methods()
    if config.methods is None:
        return tuple(available)
    unknown = [m for m in config.methods if m not in available]
    if unknown:
        raise ValueError(f"{type(config).__name__}.methods: unknown merge method(s) {unknown}; "
                         f"available: {', '.join(available)}.")
    return tuple(config.methods)


def method_kwargs(config: Any, method: str, seed: int) -> dict[str, Any]:
    """``config.method_kwargs[method]``; DARE's key is drawn from the run seed (explicit randomness)."""
    kwargs = dict(config.method_kwargs.get(method, {}))
    if method == "dare":
        kwargs.setdefault("key", jax.random.key(seed))
    return kwargs


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


def mean_stable_rank(spectra: dict[str, Any]) -> float:
    """Mean stable rank ``sum s^2 / s_0^2`` over every matrix, from ``sb.spectra`` output."""
    values = [np.ravel(np.asarray(stable_rank_from_singular_values(jnp.asarray(s)))) for s in spectra.values()]
    return float(np.mean(np.concatenate(values)))


def boosted_stable_rank(spectra: dict[str, Any], beta: float) -> float:
    """Mean stable rank after boosting at ``beta``: boosting keeps the singular vectors, so the boosted
    spectra are ``max(s_i, s_k)`` (`subboost.boosting.boost_singular_values`) and no new SVD is needed."""
    return mean_stable_rank({k: boost_singular_values(jnp.asarray(s), beta=beta) for k, s in spectra.items()})


def cutoff_indices(spectra: dict[str, Any], betas: Sequence[float]) -> dict[float, np.ndarray]:
    """Per beta, the boosting cutoff index ``k`` of every matrix (cumsum mode, as `subspace_boost`).

    ``k = 0`` means boosting raises every singular value to ``s_0`` (a flat spectrum).
    """
    return {b: np.concatenate([np.ravel(np.asarray(cutoff_index(jnp.asarray(s), beta=b))) for s in spectra.values()])
            for b in betas}


def boost_candidates(tau: dict, betas: Sequence[float], spectra: dict[str, Any] | None = None
                     ) -> tuple[dict[float, dict], dict[float, list[float]], dict[float, np.ndarray]]:
    """Boosted task vectors for the distinct betas, from one SVD per matrix (`sb.subspace_boost_sweep`).

    Betas whose cutoff indices coincide on every matrix give the *same* boosted task vector
    (`subboost.boosting.equivalent_betas`), so only the first of them is boosted and evaluated.

    Returns:
      ``(candidates, equivalent, cutoffs)``: ``{beta: boosted tau}`` for the first beta of each group,
      ``{that beta: every beta of its group}``, and the cutoff indices per beta.
    """
    cutoffs = cutoff_indices(sb.spectra(tau) if spectra is None else spectra, betas)
    equivalent = equivalent_betas(cutoffs)
    boosted = sb.subspace_boost_sweep(tau, betas=tuple(equivalent), batch_size=SVD_BATCH_SIZE)
    return dict(zip(equivalent, boosted)), equivalent, cutoffs


@dataclasses.dataclass(frozen=True)
class MergeSetting:
    """Everything the merges at one task count share: the trained models and the first ``num_tasks`` tasks.

    Attributes:
      config: the suite config; seed: the run seed (DARE's key).
      base, experts: the parameters merged (the experts stacked over all tasks).
      expert_test: each expert's test accuracy on its own task, ``(num_all_tasks,)``.
      num_tasks: how many experts (the first ones) are merged.
      evaluate: ``(tau, alphas, split) -> (A, num_tasks)`` accuracies of ``theta_0 + alpha tau``.
    """

    config: Any
    base: dict
    experts: dict
    expert_test: np.ndarray
    num_tasks: int
    seed: int
    evaluate: Evaluate

    @property
    def reference(self) -> np.ndarray:
        """The merged experts' own test accuracies (denominators of the normalized accuracy)."""
        return self.expert_test[: self.num_tasks]

    @functools.cached_property
    def task_vectors(self) -> dict:
        """The first ``num_tasks`` experts' task vectors, stacked (computed once)."""
        return task_vectors_of(self.base, self.experts, self.num_tasks)

    def merge(self, method: str) -> dict:
        return sb.merge(self.task_vectors, method=method, **method_kwargs(self.config, method, self.seed))

    def validation(self, tau, alphas) -> np.ndarray:
        """``(A, T)`` validation accuracies of ``theta_0 + alpha tau`` (the `select` evaluate function)."""
        return self.evaluate(tau, alphas, "val")

    def test(self, tau, alpha: float) -> np.ndarray:
        """``(T,)`` test accuracies of ``theta_0 + alpha tau``."""
        return self.evaluate(tau, [alpha], "test")[0]


@dataclasses.dataclass
class TrainedSuite:
    """What a suite's ``prepare`` hands the harness: trained models, their accuracies, an evaluator.

    Attributes:
      config, seed: the run.
      base, experts: the parameters merged, experts stacked on a leading task axis.
      evaluator: ``num_tasks -> evaluate`` (see `MergeSetting.evaluate`) on the first ``num_tasks`` tasks.
      pretrained_test, expert_test: ``(num_tasks,)`` test accuracies of the pretrained model with heads
        and of each expert on its own task.
      tasks: one record per task for ``results.json`` (``name``, ``num_classes``, and what the suite adds).
      regime: ``() -> dict``: the suite's regime figures (``results.json["regime"]``).
      cache_dir, cache_hit: the model-cache entry (named by the training key) and whether it was reused.
      timings: seconds per stage so far.
      fields: suite-specific top-level entries of ``results.json`` (``benchmark``, ``training``, ...).
    """

    config: Any
    seed: int
    base: dict
    experts: dict
    evaluator: Callable[[int], Evaluate]
    pretrained_test: np.ndarray
    expert_test: np.ndarray
    tasks: list[dict[str, Any]]
    regime: Callable[[], dict[str, Any]]
    cache_dir: Path
    cache_hit: bool
    timings: dict[str, float]
    fields: dict[str, Any]

    def setting(self, num_tasks: int) -> MergeSetting:
        """The merges of the first ``num_tasks`` experts."""
        return MergeSetting(self.config, self.base, self.experts, self.expert_test, num_tasks, self.seed,
                            self.evaluator(num_tasks))


def evaluate_merges(setting: MergeSetting, *, bar: tqdm) -> dict[str, Any]:
    """Every merge method, plain and boosted, on the first ``setting.num_tasks`` experts."""
    config, num_tasks, reference = setting.config, setting.num_tasks, setting.reference

    def report(tau, selection, stable_rank: float) -> dict[str, Any]:
        test = setting.test(tau, selection.alpha)
        return {
            "alpha": selection.alpha,
            "beta": selection.candidate,
            "alpha_on_edge": selection.alpha_on_edge,
            "val_accuracy": selection.val_accuracy,
            "test_accuracy": test.tolist(),
            "absolute": float(test.mean()),
            "normalized": float(np.mean(test / reference)),
            "stable_rank": stable_rank,
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
        spectra = sb.spectra(tau)
        plain = select(setting.validation, {None: tau}, alphas=config.alphas, fixed_alpha=fixed_alpha)
        candidates, equivalent, cutoffs = boost_candidates(tau, config.betas, spectra)
        boosted = select(setting.validation, candidates, alphas=config.alphas, fixed_alpha=fixed_alpha)
        results[method] = {
            "status": "ok",
            "hyper_parameters": dict(config.method_kwargs.get(method, {})),
            "fixed_alpha": fixed_alpha,
            "plain": report(tau, plain, mean_stable_rank(spectra)),
            "boosted": {**report(candidates[boosted.candidate], boosted,
                                 boosted_stable_rank(spectra, boosted.candidate)),
                        "equivalent_betas": equivalent[boosted.candidate],
                        "mean_cutoff_index": float(cutoffs[boosted.candidate].mean())},
        }
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
            spectra = sb.spectra(tau)
            candidates, equivalent, cutoffs = boost_candidates(tau, config.sweep_betas, spectra)
            rows: dict[float, dict[str, Any]] = {}
            for beta, boosted in candidates.items():
                choice = select(setting.validation, {beta: boosted}, alphas=config.alphas)
                test = setting.test(boosted, choice.alpha)
                row = {
                    "alpha": choice.alpha,
                    "alpha_on_edge": choice.alpha_on_edge,
                    "val_accuracy": choice.val_accuracy,
                    "absolute": float(test.mean()),
                    "normalized": float(np.mean(test / reference)),
                    "mean_cutoff_index": float(cutoffs[beta].mean()),
                    "stable_rank": boosted_stable_rank(spectra, beta),
                }
                rows.update({twin: {"beta": twin, **row} for twin in equivalent[beta]})  # same boosted tau
                bar.update(len(equivalent[beta]))
            sweep[method] = [rows[beta] for beta in config.sweep_betas]
    return sweep


def run_benchmark(
    config: Any,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs a suite's benchmark and writes its results; returns the ``results.json`` content.

    Args:
      config: a suite config (its ``suite`` field names the registered suite, e.g.
        `subboost.bench.suites.vision.get_config` or `subboost.bench.suites.text.get_config`).
      seed: run seed (data, initialisation, batches, DARE); the same seed gives the same tables.
      out_dir: where results go (see `prepare_out_dir`); default: the suite's own folder.
      cache_dir: model cache root (default ``<out_dir>/cache``).
      overwrite: allow writing into a non-empty directory the demo did not create.
      progress: show progress bars.
      log: receives one-line progress messages.
    """
    from subboost.bench.figures import write_figures
    from subboost.bench.report import markdown_report
    from subboost.bench.suites import get_suite

    suite = get_suite(config.suite)
    total_start = time.perf_counter()
    out = prepare_out_dir(suite.default_out if out_dir is None else out_dir, overwrite=overwrite)
    trained = suite.prepare(config, seed=seed, cache_dir=cache_dir if cache_dir is not None else out / "cache",
                            progress=progress, log=log)
    timings = dict(trained.timings)

    settings = []
    methods = methods_to_run(config)
    with tqdm(total=len(config.task_counts) * len(methods), desc="merging", unit="method",
              disable=not progress, leave=False) as bar:
        for num_tasks in config.task_counts:
            start = time.perf_counter()
            merged = evaluate_merges(trained.setting(num_tasks), bar=bar)
            zs, ex = trained.pretrained_test[:num_tasks], trained.expert_test[:num_tasks]
            settings.append({
                "num_tasks": num_tasks,
                "tasks": [t["name"] for t in trained.tasks[:num_tasks]],
                "pretrained": {"absolute": float(zs.mean()), "normalized": float(np.mean(zs / ex))},
                "experts": {"absolute": float(ex.mean()), "normalized": 1.0},
                "methods": merged,
                "seconds": time.perf_counter() - start,
            })
            timings[f"merge_{num_tasks}_tasks_s"] = settings[-1]["seconds"]
            log(f"merged {num_tasks} experts with {len(methods)} methods in {settings[-1]['seconds']:.0f} s")

    sweep = None
    if config.sweep_methods:
        start = time.perf_counter()
        largest = config.task_counts[-1]
        sweep = {"num_tasks": largest, "betas": list(config.sweep_betas),
                 "methods": boost_sweep(trained.setting(largest), progress=progress),
                 "reference": {m: settings[-1]["methods"][m]["plain"] for m in ("iso_c",)
                               if settings[-1]["methods"].get(m, {}).get("status") == "ok"}}
        timings["boost_sweep_s"] = time.perf_counter() - start
    start = time.perf_counter()
    regime = trained.regime()
    timings["regime_s"] = time.perf_counter() - start

    results = {
        "suite": suite.name,
        "size": config.name,
        "seed": seed,
        "config": config.to_dict(),
        **trained.fields,
        "training_key": trained.cache_dir.name,  # the cache entry is named by the training key
        "cache_dir": str(trained.cache_dir),
        "cache_hit": trained.cache_hit,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version()},
        "tasks": trained.tasks,
        "pretrained_test_accuracy": trained.pretrained_test.tolist(),
        "expert_test_accuracy": trained.expert_test.tolist(),
        "settings": settings,
        "regime": regime,
        **({"boost_sweep": sweep} if sweep is not None else {}),
        "timings": timings,
    }
    start = time.perf_counter()
    written = write_figures(results, out, title=suite.title)
    for stale in set(RESULT_FILES[2:]) - {p.name for p in written}:  # an earlier run's plot this run does not make
        (out / stale).unlink(missing_ok=True)
    timings["plots_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - total_start
    (out / "results.md").write_text(markdown_report(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
