"""Open question 3: does Subspace Boosting help or hurt when the experts were fine-tuned on noisy labels?

Hypothesis (Proposition 4's assumption read literally): label noise puts energy into
directions the task does not need, spread thinly over many small singular values of
each task vector. Boosting raises exactly the small singular values of the merge, so
with noisy experts it amplifies noise directions: its gain over the unboosted merge
shrinks (or turns negative) as the noise rate grows, and the boosted merge is more
aligned with the noise than the plain one.

Setting: the mini-benchmark (``--suite vision``, `subboost.bench`) or the text suite
(``--suite text``, `subboost.bench.suites.text`: experts fine-tuned from all-MiniLM-L6-v2),
the same tasks, base and seed, with the experts fine-tuned on training labels of which
a fraction ``rate`` in {0, 0.2, 0.4} was replaced by another class
(`subboost.bench.label_noise`; deterministic per seed, heads and evaluation clean).
Rate 0 is the standard benchmark's models (same training key). For each rate and each merge method (TA,
TIES, TSV-M) the run reports, alpha and beta chosen on validation as in the
benchmark: the experts' clean test accuracy; the merge's test accuracy plain and
boosted and the gain; the chosen beta and the mean cutoff index k (singular values
from index k on are raised to the k-th).

Noise directions, measured: the same seed gives the same batches at every rate, so
``noise_t = theta_t(rate) - theta_t(0)`` is what the wrong labels changed in expert
t, and ``N = sum_t noise_t`` its merge. The run reports the cosine of the merged task
vector's matrices with ``N``, plain and boosted (same alpha-free vectors): boosting
amplifies noise directions if the boosted cosine is the larger.

    python -m experiments.noisy_experts [--size tiny|default] [--suite vision|text] [--out DIR] [--cache-dir DIR]

Vision: ``tiny``: 10 tasks merged at 4 and 10; ``default``: 20 tasks merged at 8 and 20.
Text (``OPENBLAS_NUM_THREADS=1`` in the environment): ``tiny``: 4 tasks merged at 2 and 4;
``default``: 12 tasks merged at 4 and 12.
Writes ``results.json``, ``results.md`` and ``noisy_experts.png`` to ``--out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import subboost as sb
from experiments.expert_runs import load, merge_at_counts, parse_args, pyplot
from subboost.bench.settings import SVD_BATCH_SIZE
from subboost.bench.suites.vision.config import BenchConfig, get_config
from subboost.bench.pipeline import prepare_out_dir
from subboost.bench.report import method_label
from subboost.bench.suites.text.config import TextBenchConfig
from subboost.bench.suites.text.config import get_config as get_text_config

RESULT_FILES = ("results.json", "results.md", "noisy_experts.png")
RATES: tuple[float, ...] = (0.0, 0.2, 0.4)
METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "tsv")
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "vision": {"default": {"num_tasks": 20, "task_counts": (8, 20)}, "tiny": {"num_tasks": 10, "task_counts": (4, 10)}},
    "text": {"default": {"num_tasks": 12, "task_counts": (4, 12)}, "tiny": {"num_tasks": 4, "task_counts": (2, 4)}},
}
GET_CONFIG = {"vision": get_config, "text": get_text_config}


def make_config(size: str, rate: float, *, suite: str = "vision", **overrides: Any) -> BenchConfig | TextBenchConfig:
    """The ``suite``'s size ``size`` with label-noise ``rate``, this experiment's task counts and methods."""
    return GET_CONFIG[suite](size, **{"finetune_label_noise": rate, "methods": METHODS, **SIZES[suite][size],
                                      **overrides})


def _matrices(tree: dict) -> np.ndarray:
    """Every leaf with two or more axes (what boosting changes), flattened and concatenated."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)
                           if np.ndim(x) >= 2])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def noise_alignment(setting, clean_experts: dict, base: dict, method: str, beta: float) -> dict[str, float]:
    """Cosines of the merge (plain and boosted at ``beta``) with the merged noise ``N`` and the clean merge ``S``.

    ``setting``: a `MergeSetting` or `TextMergeSetting` of the noisy experts (its ``experts``: the merged
    subtree, stacked); ``clean_experts`` and ``base``: the noise-free experts and the pretrained parameters of
    the same subtree.
    """
    n = setting.num_tasks
    noise_sum = _matrices(jax.tree_util.tree_map(lambda e, c: (np.asarray(e[:n]) - np.asarray(c[:n])).sum(0),
                                                 setting.experts, clean_experts))
    clean = _matrices(jax.tree_util.tree_map(lambda c, b: (np.asarray(c[:n]) - np.asarray(b)[None]).sum(0),
                                             clean_experts, base))
    tau = setting.merge(method)
    plain = _matrices(tau)
    boosted = _matrices(sb.subspace_boost(tau, beta=beta, batch_size=SVD_BATCH_SIZE))
    return {"plain_vs_noise": cosine(plain, noise_sum), "boosted_vs_noise": cosine(boosted, noise_sum),
            "plain_vs_clean": cosine(plain, clean), "boosted_vs_clean": cosine(boosted, clean),
            "noise_over_clean_norm": float(np.linalg.norm(noise_sum) / max(np.linalg.norm(clean), 1e-30))}


def run(configs: Sequence[BenchConfig | TextBenchConfig], *, out_dir: str | Path, cache_dir: str | Path, seed: int = 0,
        overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains (or loads) experts at each config's noise rate, merges them, writes the results.

    ``configs[0]`` must be the noise-free one (the reference for the noise directions).
    """
    if configs[0].finetune_label_noise != 0.0:
        raise ValueError("noisy_experts.run: configs[0] must have finetune_label_noise=0 (the clean reference).")
    start = time.perf_counter()
    out = prepare_out_dir(out_dir, overwrite=overwrite, result_files=RESULT_FILES)
    rows, clean_experts = [], None
    for config in tqdm(configs, desc="noise rates", unit="rate", disable=not progress):
        rate = config.finetune_label_noise
        models = load(config, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
        if clean_experts is None:
            clean_experts = models.experts
        pretrained, experts = models.pretrained_test, models.expert_test
        settings = merge_at_counts(models, progress=progress, desc=f"merging (noise {rate:g})")
        for s in settings:
            setting = models.setting(s["num_tasks"])
            for method, entry in s["methods"].items():
                if entry["status"] == "ok":
                    entry["noise_alignment"] = noise_alignment(setting, clean_experts, models.base, method,
                                                               entry["boosted"]["beta"])
                    entry["gain"] = entry["boosted"]["absolute"] - entry["plain"]["absolute"]
                    entry["normalized_gain"] = entry["boosted"]["normalized"] - entry["plain"]["normalized"]
        rows.append({"rate": rate, "cache_dir": str(models.cache_dir), "cache_hit": models.cache_hit,
                     "pretrained_test_accuracy": pretrained.tolist(), "expert_test_accuracy": experts.tolist(),
                     "expert_mean": float(experts.mean()), "timings": models.timings, "settings": settings})
    suite = "text" if isinstance(configs[0], TextBenchConfig) else "vision"
    results = {"experiment": "noisy_experts", "suite": suite, "size": configs[0].name, "seed": seed,
               "rates": [r["rate"] for r in rows], "methods": list(configs[0].methods),
               "config": configs[0].to_dict(), "runs": rows, "total_s": time.perf_counter() - start}
    plot(results, out / "noisy_experts.png")
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b != 0 else "n/a"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Noisy experts ({results.get('suite', 'vision')} suite, {results['size']} size, seed {results['seed']})", "",
             "Experts fine-tuned with a fraction `rate` of wrong training labels; everything evaluated on clean "
             "test labels. Accuracy in %, absolute (normalized by the noisy experts' own accuracy in brackets). "
             "Gain = boosted - plain, absolute points. k = mean cutoff index of the chosen beta. "
             "cos(N): cosine of the merge's matrices with the merged noise directions, plain -> boosted; "
             "cos(clean): the same with the clean experts' summed task vectors; N/clean: the ratio of the two "
             "cosines, plain -> boosted (above 1: more aligned with the noise than with the clean signal).", "",
             "| rate | experts | T | method | plain | boosted | gain | beta | k | cos(N) plain -> boosted | cos(clean) plain -> boosted | N/clean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        for s in run["settings"]:
            for method, e in s["methods"].items():
                if e["status"] != "ok":
                    lines.append(f"| {run['rate']:g} | {100 * run['expert_mean']:.1f} | {s['num_tasks']} | "
                                 f"{method_label(method)} | n/a | n/a | | | | | | |")
                    continue
                p, b, a = e["plain"], e["boosted"], e["noise_alignment"]
                cos_n = "n/a" if run["rate"] == 0 else f"{a['plain_vs_noise']:.3f} -> {a['boosted_vs_noise']:.3f}"
                ratio = "n/a" if run["rate"] == 0 else (f"{_ratio(a['plain_vs_noise'], a['plain_vs_clean'])} -> "
                                                        f"{_ratio(a['boosted_vs_noise'], a['boosted_vs_clean'])}")
                lines.append(
                    f"| {run['rate']:g} | {100 * run['expert_mean']:.1f} | {s['num_tasks']} | {method_label(method)} "
                    f"| {100 * p['absolute']:.1f} ({100 * p['normalized']:.1f}) | {100 * b['absolute']:.1f} "
                    f"({100 * b['normalized']:.1f}) | {100 * e['gain']:+.1f} | {b['beta']} | {b['mean_cutoff_index']:.1f} "
                    f"| {cos_n} | {a['plain_vs_clean']:.3f} -> {a['boosted_vs_clean']:.3f} | {ratio} |")
    lines += ["", "Experts' clean test accuracy (mean over tasks) per noise rate: "
              + ", ".join(f"{r['rate']:g}: {100 * r['expert_mean']:.1f}%" for r in results["runs"]) + ".",
              f"Wall time: {results['total_s']:.0f} s (cache hits: "
              + ", ".join(str(r["cache_hit"]) for r in results["runs"]) + ").", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, (gain, cut) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates = results["rates"]
    largest = results["runs"][0]["settings"][-1]["num_tasks"]
    for i, method in enumerate(results["methods"]):
        entries = [next(s for s in r["settings"] if s["num_tasks"] == largest)["methods"][method] for r in results["runs"]]
        ok = [(rate, e) for rate, e in zip(rates, entries) if e["status"] == "ok"]
        label = method_label(method)
        gain.plot([r for r, _ in ok], [100 * e["gain"] for _, e in ok], marker="o", color=f"C{i}", label=label)
        cut.plot([r for r, _ in ok], [e["boosted"]["mean_cutoff_index"] for _, e in ok], marker="o", color=f"C{i}",
                 label=label)
    gain.axhline(0.0, color="k", lw=0.8)
    gain.set(xlabel="label-noise rate", ylabel="boosted - plain test accuracy (points)",
             title=f"Boosting's gain at {largest} experts ({results.get('suite', 'vision')} suite)")
    cut.set(xlabel="label-noise rate", ylabel="mean cutoff index k of the chosen beta", title="Cutoff k")
    cut.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], "results/noisy_experts", argv)
    configs = [make_config(args.size, rate, suite=args.suite) for rate in RATES]
    run(configs, out_dir=args.out, cache_dir=args.cache_dir or Path(args.out) / "cache", seed=args.seed,
        overwrite=args.overwrite)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
