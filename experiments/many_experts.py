"""Open question 2: does merging keep degrading past 20 experts, and does boosting stop it?

Hypothesis (the paper's motivation, extrapolated): as the number of merged experts
grows, the merged task vector's matrices lose effective rank (rank collapse), so
the normalized accuracy of every plain merge keeps falling from 4 to 50 experts,
and its stable rank stays low. Subspace Boosting raises the stable rank at every
count and so degrades more slowly; the isotropic methods (Iso-C, Iso-CTS) already
have a flat spectrum and gain little from it. "Stops degrading" is read off the
table: the change in normalized accuracy between the last two counts.

Vision tasks (``--suite vision``): `subboost.bench.suites.vision.task_variants.MANY_TASKS`: the benchmark's 20 tasks in their
order, then 30 class regroupings of them (parity, halves, shifted pairs, mod 3,
mirror pairs of the parent's classes). Regroupings ask the encoder for *different*
invariances on the same images (parity merges classes 0 and 2 that halves
separates), so their experts disagree; label permutations would not (the frozen
prototype heads make a permuted task the same task). The run measures it: the
mean pairwise cosine of the task vectors, over all pairs, within a family (a
task and its variants) and across families.

Text tasks (``--suite text``, ``OPENBLAS_NUM_THREADS=1`` in the environment):
`subboost.bench.suites.text.task_variants.MANY_TASKS`: the text suite's 12 tasks in their order, then 38 variants
(class regroupings of the 3- and 4-class tasks, number tasks on the parity sentences, and tasks that read
the nuisance names, things, places and times every sentence carries).

    python -m experiments.many_experts [--size tiny|default] [--suite vision|text] [--out DIR] [--cache-dir DIR]

Vision ``default``: the benchmark's default size (shipped base, 400 fine-tuning steps)
on 50 tasks, merged at 4, 8, 14, 20, 30 and 50 experts; ``tiny``: the tiny size
(pretrained in the run) on 30 tasks at 4, 10, 20 and 30. Text ``default``: all-MiniLM-L6-v2
(6 blocks) on 50 tasks at 4, 8, 12, 20, 30 and 50; ``tiny``: its first block, 50 tasks at 4, 12, 30 and 50. Methods: TA, TIES,
TSV-M, Iso-C, Iso-CTS, each plain and boosted (beta from the benchmark's grid),
alpha and beta chosen on validation as in the benchmark. Writes
``results.json``, ``results.md`` and ``many_experts.png`` to ``--out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.expert_runs import METHODS, fmt, load, merge_at_counts, parse_args, pyplot
from subboost.bench.suites.vision.config import BenchConfig, get_config
from subboost.bench.pipeline import prepare_out_dir
from subboost.bench.regime import task_vector_geometry
from subboost.bench.report import method_label
from subboost.bench.suites.text.config import TextBenchConfig
from subboost.bench.suites.text.config import get_config as get_text_config

RESULT_FILES = ("results.json", "results.md", "many_experts.png")
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "vision": {"default": {"num_tasks": 50, "task_counts": (4, 8, 14, 20, 30, 50)},
               "tiny": {"num_tasks": 30, "task_counts": (4, 10, 20, 30)}},
    "text": {"default": {"num_tasks": 50, "task_counts": (4, 8, 12, 20, 30, 50)},
             "tiny": {"num_tasks": 50, "task_counts": (4, 12, 30, 50)}},
}
GET_CONFIG = {"vision": get_config, "text": get_text_config}
STANDARD_TASKS = {"vision": 20, "text": 12}  # how many tasks of the "many" set are the standard suite's


def make_config(size: str, *, suite: str = "vision", **overrides: Any) -> BenchConfig | TextBenchConfig:
    """The ``suite``'s size ``size`` on the ``"many"`` task set, with this experiment's task counts and methods."""
    return GET_CONFIG[suite](size, **{"task_set": "many", "methods": METHODS, **SIZES[suite][size], **overrides})


def family(task_name: str) -> str:
    """A variant's parent (``"shapes__parity"`` -> ``"shapes"``); a standard task is its own family."""
    return task_name.split("__")[0]


def disagreement(cosines: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Mean pairwise cosine of the task vectors: all pairs, same family, different families."""
    fam = np.array([family(n) for n in names])
    i, j = np.triu_indices(len(names), 1)
    same = fam[i] == fam[j]
    pairs = cosines[i, j]
    mean = lambda x: float(x.mean()) if x.size else float("nan")  # noqa: E731
    return {"mean_cosine": mean(pairs), "same_family": mean(pairs[same]), "across_families": mean(pairs[~same]),
            "max_cosine": float(pairs.max()), "same_family_pairs": int(same.sum())}


def trend(results: dict[str, Any], method: str, variant: str) -> float | None:
    """Change in normalized accuracy (points) between the last two task counts (negative: still degrading);
    None when the method could not run at either."""
    entries = [s["methods"].get(method, {}) for s in results["settings"][-2:]]
    if len(entries) < 2 or any(e.get("status") != "ok" for e in entries):
        return None
    return 100 * (entries[1][variant]["normalized"] - entries[0][variant]["normalized"])


def over_zero_shot(results: dict[str, Any], method: str, variant: str) -> list[float | None]:
    """Normalized accuracy minus the zero-shot model's (points), per task count (None where n/a)."""
    return [100 * (s["methods"][method][variant]["normalized"] - s["pretrained_normalized"])
            if s["methods"].get(method, {}).get("status") == "ok" else None for s in results["settings"]]


def run(config: BenchConfig | TextBenchConfig, *, out_dir: str | Path, cache_dir: str | Path, seed: int = 0, overwrite: bool = False,
        progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains (or loads) the experts of ``config``, merges them at every task count, writes the results."""
    start = time.perf_counter()
    out = prepare_out_dir(out_dir, overwrite=overwrite, result_files=RESULT_FILES)
    models = load(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    pretrained, experts = models.pretrained_test, models.expert_test
    geometry = task_vector_geometry(models.base, models.experts)
    cosines = np.asarray(geometry["cosine_matrix"])
    settings = merge_at_counts(models, progress=progress, desc="merging many experts")
    for s in settings:
        n = s["num_tasks"]
        s["pretrained_normalized"] = float(np.mean(pretrained[:n] / experts[:n]))
        s["disagreement"] = disagreement(cosines[:n, :n], models.task_names[:n])
    results = {
        "experiment": "many_experts",
        "suite": "text" if isinstance(config, TextBenchConfig) else "vision",
        "size": config.name,
        "seed": seed,
        "config": config.to_dict(),
        "cache_dir": str(models.cache_dir),
        "cache_hit": models.cache_hit,
        "tasks": models.task_names,
        "num_classes": models.num_classes,
        "pretrained_test_accuracy": pretrained.tolist(),
        "expert_test_accuracy": experts.tolist(),
        "disagreement": disagreement(cosines, models.task_names),
        "task_vector_relative_norms": geometry["relative_norm"],
        "settings": settings,
        "timings": {**models.timings, "total_s": 0.0},
    }
    results["trend_last_step"] = {m: {v: trend(results, m, v) for v in ("plain", "boosted")} for m in config.methods}
    results["timings"]["total_s"] = time.perf_counter() - start
    plot(results, out / "many_experts.png")
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict[str, Any]) -> str:
    counts = [s["num_tasks"] for s in results["settings"]]
    head = "| method | " + " | ".join(f"T={n}" for n in counts) + " | last step (pts) |"
    rule = "|---" * (len(counts) + 2) + "|"
    suite = results.get("suite", "vision")
    lines = [f"# Many experts ({suite} suite, {results['size']} size, seed {results['seed']})", "",
             "Normalized test accuracy (%) and, in brackets, the mean stable rank of the merged task vector's "
             "matrices; alpha (and beta) chosen on validation. Last step: change from the second-last to the last count.",
             "", head, rule,
             "| zero-shot | " + " | ".join(f"{100 * s['pretrained_normalized']:.1f}" for s in results["settings"]) + " | |"]
    for method in results["config"]["methods"]:
        for variant in ("plain", "boosted"):
            cells = [f"{fmt(s['methods'].get(method), variant)} ({fmt(s['methods'].get(method), variant, 'stable_rank', percent=False)})"
                     for s in results["settings"]]
            step = results["trend_last_step"][method][variant]
            label = method_label(method) + (" + boost" if variant == "boosted" else "")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {'n/a' if step is None else f'{step:+.1f}'} |")
    lines += ["", "Normalized accuracy minus the zero-shot model's (points): what merging adds over the base.", "",
              "| method | " + " | ".join(f"T={n}" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for method in results["config"]["methods"]:
        for variant in ("plain", "boosted"):
            label = method_label(method) + (" + boost" if variant == "boosted" else "")
            lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:+.1f}"
                                                      for v in over_zero_shot(results, method, variant)) + " |")
    lines += ["", "Disagreement: mean pairwise cosine of the task vectors among the merged experts.", "",
              "| T | all pairs | same family | across families | max |", "|---|---|---|---|---|"]
    for s in results["settings"]:
        d = s["disagreement"]
        lines.append(f"| {s['num_tasks']} | {d['mean_cosine']:.3f} | {d['same_family']:.3f} "
                     f"| {d['across_families']:.3f} | {d['max_cosine']:.3f} |")
    experts, standard = np.asarray(results["expert_test_accuracy"]), STANDARD_TASKS[suite]
    lines += ["", f"Experts' mean test accuracy: {100 * experts[:standard].mean():.1f}% on the first {standard} "
              f"tasks, {100 * experts[standard:].mean():.1f}% on the variants." if experts.size > standard else "",
              learnability(results, standard),
              f"Wall time: {results['timings']['total_s']:.0f} s (cache hit: {results['cache_hit']}).", ""]
    return "\n".join(lines)


def learnability(results: dict[str, Any], standard: int) -> str:
    """One sentence: on how many variants (tasks past the first ``standard``) the expert beats the pretrained
    model with the same frozen head, on test, and the variants where it does not."""
    experts, pretrained = (np.asarray(results[k]) for k in ("expert_test_accuracy", "pretrained_test_accuracy"))
    margin = (experts - pretrained)[standard:]
    if not margin.size:
        return ""
    names = results["tasks"][standard:]
    worse = ", ".join(f"{n} ({100 * m:+.1f})" for n, m in zip(names, margin) if m <= 0) or "none"
    return (f"Expert above the pretrained model + heads on {int((margin > 0).sum())} of {margin.size} variants "
            f"(median margin {100 * np.median(margin):+.1f} points); not above: {worse}.")


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, (acc, rank) = plt.subplots(1, 2, figsize=(12, 4.5))
    counts = [s["num_tasks"] for s in results["settings"]]
    for i, method in enumerate(results["config"]["methods"]):
        colour = f"C{i}"
        for variant, style in (("plain", "-"), ("boosted", "--")):
            xs = [s["num_tasks"] for s in results["settings"] if s["methods"].get(method, {}).get("status") == "ok"]
            entries = [s["methods"][method][variant] for s in results["settings"]
                       if s["methods"].get(method, {}).get("status") == "ok"]
            label = method_label(method) + (" + boost" if variant == "boosted" else "")
            acc.plot(xs, [100 * e["normalized"] for e in entries], style, marker="o", color=colour, label=label)
            rank.plot(xs, [e["stable_rank"] for e in entries], style, marker="o", color=colour, label=label)
    acc.plot(counts, [100 * s["pretrained_normalized"] for s in results["settings"]], ":", color="k", label="zero-shot")
    acc.set(xlabel="number of experts merged", ylabel="normalized test accuracy (%)", title=f"Accuracy vs experts ({results.get('suite', 'vision')} suite)")
    rank.set(xlabel="number of experts merged", ylabel="mean stable rank", title="Stable rank of the merge")
    handles, labels = rank.get_legend_handles_labels()
    zero_shot = acc.get_legend_handles_labels()[0][-1]  # only on the accuracy panel
    rank.legend(handles + [zero_shot], labels + ["zero-shot"], loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], "results/many_experts", argv)
    config = make_config(args.size, suite=args.suite)
    run(config, out_dir=args.out, cache_dir=args.cache_dir or Path(args.out) / "cache", seed=args.seed,
        overwrite=args.overwrite)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
