"""Open question 1: choose the merging coefficient alpha without validation data.

    python -m experiments.alpha_without_validation [--size tiny|default] [--suite vision|text] [--out DIR]

Hypothesis: a rule that reads alpha off the task vectors alone lands close enough to
the validation-tuned alpha that the merged model loses at most a few points of
normalized accuracy. Two rules (`subboost.alpha_rules`):

* ``hogsvd``: `subboost.alpha_from_hogsvd` -- alpha such that the merged task
  vector's generalized singular values in the experts' shared HO-GSVD basis carry
  as much energy as the strongest expert's, direction by direction;
* ``norm``: `subboost.alpha_from_norm` -- ``||alpha tau_merged|| = mean_t ||tau_t||``.

For every task count of the suite and for TA, TIES, TSV-M and Iso-C, each plain and
boosted (Subspace Boosting at the paper's default beta = 0.01, the same boosted task
vector for every alpha choice), alpha is chosen (a) on validation by the benchmark's own
sweep (`subboost.bench.sweep.select`: the coarse log grid, refined by 2^(+-1/2)) and
(b) by each rule; all choices are scored on the test split. Reported: the chosen alphas,
normalized test accuracy (merged / expert accuracy, averaged over the tasks), and the
gap rule - tuned in points. Writes ``results.json``, ``results.md`` and
``alpha_without_validation.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import subboost as sb
from experiments.merge_settings import DEFAULT_BETA, add_common_arguments, boost, load_suite, prepare_out
from subboost.bench.settings import SVD_BATCH_SIZE
from subboost.bench.sweep import select

METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "tsv", "iso_c")
# One layer at a time, as the benchmark runs its SVDs (`subboost.bench.settings.SVD_BATCH_SIZE`: batched LAPACK
# kernels on a 2-thread CPU pool can wait on each other forever).
RULES = {
    "hogsvd": lambda tvs, tau: sb.alpha_from_hogsvd(tvs, tau, batch_size=SVD_BATCH_SIZE),
    "norm": lambda tvs, tau: sb.alpha_from_norm(tvs, tau),
}
RESULT_FILES = ("results.json", "results.md", "alpha_without_validation.png")


def evaluate_setting(setting, *, alphas, beta: float, bar, methods=METHODS) -> list[dict[str, Any]]:
    """Tuned and rule-chosen alphas for every method, plain and boosted, at one task count."""
    rows = []
    tvs, reference = setting.task_vectors, setting.reference
    for method in methods:
        merged = setting.merge(method)
        for boosted in (False, True):
            bar.set_postfix_str(f"T={setting.num_tasks} {method}{' boosted' if boosted else ''}")
            tau = boost(merged, beta) if boosted else merged
            tuned = select(setting.validation, {None: tau}, alphas=alphas)
            row = {"num_tasks": setting.num_tasks, "method": method, "boosted": boosted,
                   "beta": beta if boosted else None}
            test = setting.test(tau, tuned.alpha)
            row["tuned"] = {"alpha": tuned.alpha, "alpha_on_edge": tuned.alpha_on_edge,
                            "val_accuracy": tuned.val_accuracy, "normalized": float(np.mean(test / reference)),
                            "absolute": float(test.mean())}
            for name, rule in RULES.items():
                alpha = float(rule(tvs, tau))
                test = setting.test(tau, alpha)
                normalized = float(np.mean(test / reference))
                row[name] = {"alpha": alpha, "normalized": normalized, "absolute": float(test.mean()),
                             "gap": normalized - row["tuned"]["normalized"],
                             "alpha_ratio": alpha / tuned.alpha}
            rows.append(row)
            bar.update(1)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Alpha without validation data ({results['suite']} suite, {results['size']})",
        "",
        f"Normalized test accuracy (%) at alpha chosen on validation (tuned) and by each rule; gap = rule - tuned "
        f"in points. Boosted: Subspace Boosting at beta = {results['beta']}. Wall time {results['wall_s']:.0f} s.",
        "",
        "| T | method | boost | tuned alpha | tuned | HO-GSVD alpha | HO-GSVD | gap | norm alpha | norm | gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        h, n, t = r["hogsvd"], r["norm"], r["tuned"]
        lines.append(
            f"| {r['num_tasks']} | {r['method']} | {'yes' if r['boosted'] else 'no'} | {t['alpha']:.3g} | "
            f"{100 * t['normalized']:.1f} | {h['alpha']:.3g} | {100 * h['normalized']:.1f} | {100 * h['gap']:+.1f} | "
            f"{n['alpha']:.3g} | {100 * n['normalized']:.1f} | {100 * n['gap']:+.1f} |")
    s = results["summary"]
    lines += ["", "| rule | mean gap (points) | worst gap | median alpha / tuned alpha |", "|---|---|---|---|"]
    for name in RULES:
        lines.append(f"| {name} | {100 * s[name]['mean_gap']:+.1f} | {100 * s[name]['worst_gap']:+.1f} | "
                     f"{s[name]['median_alpha_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), sharey=True, squeeze=False)
    axes = axes[0]
    colors = {"tuned": "k", "hogsvd": "tab:blue", "norm": "tab:orange"}
    for ax, method in zip(axes, methods):
        for boosted, style in ((False, "-"), (True, "--")):
            rows = [r for r in results["rows"] if r["method"] == method and r["boosted"] == boosted]
            xs = [r["num_tasks"] for r in rows]
            for name, color in colors.items():
                ax.plot(xs, [100 * r[name]["normalized"] for r in rows], style, color=color, marker="o",
                        label=f"{name}{' + boost' if boosted else ''}")
        ax.set_title(method)
        ax.set_xlabel("tasks merged")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalized test accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"alpha without validation ({results['suite']}, {results['size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: {"mean_gap": float(np.mean([r[name]["gap"] for r in rows])),
                   "worst_gap": float(np.min([r[name]["gap"] for r in rows])),
                   "median_alpha_ratio": float(np.median([r[name]["alpha_ratio"] for r in rows]))}
            for name in RULES}


def run(*, size: str = "tiny", suite: str = "vision", out: str | Path = "results/alpha_without_validation",
        seed: int = 0, cache_dir: str | Path, beta: float = DEFAULT_BETA, progress: bool = True,
        task_counts: tuple[int, ...] | None = None, methods: tuple[str, ...] = METHODS,
        log=print) -> dict[str, Any]:
    """Runs the experiment and writes its files to ``out``; returns the ``results.json`` content.

    ``task_counts`` (default: the suite's) and ``methods`` restrict the run (the tests use one of each).
    """
    start = time.perf_counter()
    out = Path(out)
    loaded = load_suite(suite, size, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    counts = loaded.task_counts if task_counts is None else tuple(task_counts)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: {unknown} not among {', '.join(METHODS)}.")
    rows = []
    with tqdm(total=len(counts) * len(methods) * 2, desc="alpha rules", unit="merge",
              disable=not progress) as bar:
        for num_tasks in counts:
            rows += evaluate_setting(loaded.setting(num_tasks), alphas=loaded.alphas, beta=beta, bar=bar,
                                     methods=methods)
    results = {
        "experiment": "alpha_without_validation",
        "suite": suite, "size": size, "seed": seed, "beta": beta,
        "alpha_grid": list(loaded.alphas), "task_counts": list(counts), "methods": list(methods),
        "cache_dir": str(loaded.cache_dir), "cache_hit": loaded.cache_hit, "load_s": loaded.load_s,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version()},
        "rows": rows, "summary": summarise(rows),
    }
    results["wall_s"] = time.perf_counter() - start
    write(results, out)
    return results


def write(results: dict[str, Any], out: Path) -> None:
    prepare_out(out, experiment=results["experiment"], files=RESULT_FILES)
    plot(results, out / "alpha_without_validation.png")
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--out", default="results/alpha_without_validation", help="output directory")
    args = parser.parse_args(argv)
    results = run(size=args.size, suite=args.suite, out=args.out, seed=args.seed, cache_dir=args.cache_dir,
                  progress=not args.no_progress)
    print(markdown(results))


if __name__ == "__main__":
    main()
