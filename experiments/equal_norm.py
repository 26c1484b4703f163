"""The reviewers' question: is Subspace Boosting more than rescaling?

    python -m experiments.equal_norm [--size tiny|default] [--suite vision|text] [--out DIR]

Hypothesis: boosting helps through the *shape* of the merged spectrum (raising the
small singular values), not through the larger norm it gives the task vector; so at
the boosted model's norm, plain task arithmetic (TA) is worse than boosted TA.

At one task count (``--num-tasks``, default the suite's largest), for every beta of the benchmark's boosting sweep
(`subboost.bench.suites.vision.config.SWEEP_BETAS`; beta = 1 leaves the spectrum as it is):

* ``boosted``: TA boosted at beta, alpha tuned on validation (the benchmark's sweep,
  `subboost.bench.sweep.select`); ``alpha * boost(tau)`` is the *reference* task vector;
* at the reference's norm (alpha fixed to 1 after rescaling; no tuning):
  ``ta_matched`` -- TA with every matrix rescaled to the reference matrix's Frobenius
  norm (and every other leaf to the reference leaf's norm): same per-matrix scale,
  TA's own spectrum shape; ``ta_global`` -- TA rescaled once to the reference's global
  norm; ``iso_c_matched`` -- Iso-C (a flat spectrum at the mean singular value, i.e. the
  shape of boosting with every singular value raised) matched per matrix;
  ``top_k_matched`` -- TA truncated to its singular directions ``0..k`` (``k`` the
  boosting cutoff at beta of each matrix) matched per matrix;
* ``top_k_tuned``: the same truncation with its own tuned alpha.

Baselines: TA and Iso-C with their own tuned alphas. Shape versus scale: ``boosted -
ta_matched`` is the effect of the spectrum's shape at equal scale; ``ta_tuned -
ta_matched`` the effect of scale at TA's shape. Accuracy is normalized test accuracy
(merged / expert, averaged over tasks). Writes ``results.json``, ``results.md`` and
``equal_norm.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.merge_settings import add_common_arguments, boost, load_suite, prepare_out
from subboost import linalg
from subboost.bench.sweep import select
from subboost.boosting import cutoff_index
from subboost.tree import matrix_plan

RESULT_FILES = ("results.json", "results.md", "equal_norm.png")
MATCHED = ("ta_matched", "ta_global", "iso_c_matched", "top_k_matched")


def matrix_norms(tree) -> np.ndarray:
    """Frobenius norm of every matrix (`subboost.tree.matrix_plan`, as boosting reads them), concatenated."""
    groups = matrix_plan(tree).gather(tree)
    return np.concatenate([np.ravel(np.asarray(jnp.linalg.norm(x, axis=(-2, -1)))) for x in groups.values()])


def global_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(tree))))


def _ratio(target, current):
    return jnp.where(current > 0, target / jnp.where(current > 0, current, 1), 0.0)


def rescale_to(tree, reference):
    """``tree`` with every matrix scaled to the Frobenius norm of the same matrix of ``reference``, and every
    other leaf to the norm of the reference's leaf (a matrix or leaf that is zero stays zero)."""
    plan = matrix_plan(tree)
    ours, theirs = plan.gather(tree), plan.gather(reference)
    scaled = {g: ours[g] * _ratio(jnp.linalg.norm(theirs[g], axis=(-2, -1), keepdims=True),
                                  jnp.linalg.norm(ours[g], axis=(-2, -1), keepdims=True)) for g in ours}
    leaves = plan.scatter(scaled)
    for i, (x, r) in enumerate(zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(reference))):
        if not plan.is_matrix_leaf(i):
            leaves[i] = x * _ratio(jnp.linalg.norm(r), jnp.linalg.norm(x))
    return plan.rebuild(tree, leaves)


def svd_one_at_a_time(x):
    """``linalg.svd`` of a ``(G, m, n)`` group, one matrix at a time (`jax.lax.map`), as the benchmark runs
    its SVDs (`subboost.bench.settings.SVD_BATCH_SIZE`: batched CPU LAPACK kernels can deadlock on 2 threads)."""
    return jax.lax.map(linalg.svd, x)


def top_k(tree, beta: float):
    """Every matrix truncated to its singular directions ``0..k``, ``k = cutoff_index(s, beta)`` (the directions
    boosting leaves as they are); other leaves unchanged."""
    plan = matrix_plan(tree)
    out = {}
    for g, x in plan.gather(tree).items():
        u, s, vh = svd_one_at_a_time(x)
        k = cutoff_index(s, beta=beta)
        kept = jnp.where(jnp.arange(s.shape[-1]) <= k[..., None], s, 0)
        out[g] = linalg.reconstruct(u, kept, vh).astype(x.dtype)
    return plan.rebuild(tree, plan.scatter(out))


def scaled(tree, alpha: float):
    return jax.tree_util.tree_map(lambda x: x * jnp.asarray(alpha, x.dtype), tree)


def run(*, size: str = "tiny", suite: str = "vision", out: str | Path = "results/equal_norm", seed: int = 0,
        cache_dir: str | Path, betas: tuple[float, ...] | None = None, num_tasks: int | None = None,
        progress: bool = True, log=print) -> dict[str, Any]:
    """Runs the experiment and writes its files to ``out``; returns the ``results.json`` content.

    ``betas`` defaults to the suite's boosting sweep (the tests use fewer); ``num_tasks`` (how many experts
    are merged) to the suite's largest task count.
    """
    start = time.perf_counter()
    out = Path(out)
    loaded = load_suite(suite, size, seed=seed, cache_dir=cache_dir, progress=progress, log=log)
    betas = tuple(loaded.sweep_betas if betas is None else betas)
    num_tasks = loaded.task_counts[-1] if num_tasks is None else num_tasks
    if not 2 <= num_tasks <= loaded.task_counts[-1]:
        raise ValueError(f"--num-tasks must lie in [2, {loaded.task_counts[-1]}] for the {size} {suite} suite, "
                         f"got {num_tasks}.")
    setting = loaded.setting(num_tasks)
    alphas, reference_acc = loaded.alphas, setting.reference

    def normalized(tau, alpha) -> float:
        return float(np.mean(setting.test(tau, alpha) / reference_acc))

    def tuned(tau) -> dict[str, Any]:
        choice = select(setting.validation, {None: tau}, alphas=alphas)
        return {"alpha": choice.alpha, "alpha_on_edge": choice.alpha_on_edge,
                "normalized": normalized(tau, choice.alpha), "norm": choice.alpha * global_norm(tau)}

    with tqdm(total=2 + len(betas), desc=f"equal norm ({num_tasks} tasks)", unit="beta", disable=not progress) as bar:
        ta, iso = setting.merge("task_arithmetic"), setting.merge("iso_c")
        baselines = {"ta_tuned": tuned(ta)}
        bar.update(1)
        baselines["iso_c_tuned"] = tuned(iso)
        bar.update(1)
        rows = []
        spectra = [svd_one_at_a_time(x)[1] for x in matrix_plan(ta).gather(ta).values()]
        cutoffs = {beta: np.concatenate([np.ravel(np.asarray(cutoff_index(s, beta=beta))) for s in spectra])
                   for beta in betas}
        for beta in betas:
            bar.set_postfix_str(f"beta={beta}")
            twin = next((r for r in rows if np.array_equal(cutoffs[r["beta"]], cutoffs[beta])), None)
            if twin is not None:  # the same cutoff on every matrix: the same boosted and truncated task vectors
                rows.append({**twin, "beta": beta})
                bar.update(1)
                continue
            boosted, truncated = boost(ta, beta), top_k(ta, beta)
            row = {"beta": beta, "mean_cutoff_index": float(cutoffs[beta].mean())}
            row["boosted"] = tuned(boosted)
            reference = scaled(boosted, row["boosted"]["alpha"])
            ref_norms = matrix_norms(reference)
            variants = {
                "ta_matched": rescale_to(ta, reference),
                "ta_global": scaled(ta, global_norm(reference) / global_norm(ta)),
                "iso_c_matched": rescale_to(iso, reference),
                "top_k_matched": rescale_to(truncated, reference),
            }
            for name, tau in variants.items():
                row[name] = {"alpha": 1.0, "normalized": normalized(tau, 1.0), "norm": global_norm(tau),
                             "max_matrix_norm_deviation": float(np.max(np.abs(matrix_norms(tau) - ref_norms)
                                                                       / np.maximum(ref_norms, 1e-30)))}
            row["top_k_tuned"] = tuned(truncated)
            row["shape_effect"] = row["boosted"]["normalized"] - row["ta_matched"]["normalized"]
            row["scale_effect"] = baselines["ta_tuned"]["normalized"] - row["ta_matched"]["normalized"]
            rows.append(row)
            bar.update(1)

    results = {
        "experiment": "equal_norm", "suite": suite, "size": size, "seed": seed, "num_tasks": num_tasks,
        "betas": list(betas), "alpha_grid": list(alphas),
        "cache_dir": str(loaded.cache_dir), "cache_hit": loaded.cache_hit, "load_s": loaded.load_s,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version()},
        "baselines": baselines, "rows": rows,
    }
    results["wall_s"] = time.perf_counter() - start
    prepare_out(out, experiment="equal_norm", files=RESULT_FILES)
    plot(results, out / "equal_norm.png")
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict[str, Any]) -> str:
    b = results["baselines"]
    lines = [
        f"# Is boosting more than rescaling? ({results['suite']} suite, {results['size']}, "
        f"{results['num_tasks']} tasks)",
        "",
        f"Normalized test accuracy (%). TA tuned: {100 * b['ta_tuned']['normalized']:.1f} "
        f"(alpha {b['ta_tuned']['alpha']:.3g}, norm {b['ta_tuned']['norm']:.3g}); Iso-C tuned: "
        f"{100 * b['iso_c_tuned']['normalized']:.1f} (alpha {b['iso_c_tuned']['alpha']:.3g}, "
        f"norm {b['iso_c_tuned']['norm']:.3g}). *matched*: rescaled, matrix by matrix, to the norms of the tuned "
        f"boosted task vector (*global*: one factor for the whole vector). Wall time {results['wall_s']:.0f} s.",
        "",
        "| beta | mean k | boosted alpha | norm | boosted | TA matched | TA global | Iso-C matched | top-k matched "
        "| top-k tuned | shape effect | scale effect |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['beta']} | {r['mean_cutoff_index']:.1f} | {r['boosted']['alpha']:.3g} | {r['boosted']['norm']:.3g} "
            f"| {100 * r['boosted']['normalized']:.1f} | {100 * r['ta_matched']['normalized']:.1f} "
            f"| {100 * r['ta_global']['normalized']:.1f} | {100 * r['iso_c_matched']['normalized']:.1f} "
            f"| {100 * r['top_k_matched']['normalized']:.1f} | {100 * r['top_k_tuned']['normalized']:.1f} "
            f"| {100 * r['shape_effect']:+.1f} | {100 * r['scale_effect']:+.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, b = results["rows"], results["baselines"]
    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("boosted", "o-k"), ("ta_matched", "s-"), ("ta_global", "s:"), ("iso_c_matched", "^-"),
                        ("top_k_matched", "v-"), ("top_k_tuned", "v--")):
        ax.plot(xs, [100 * r[name]["normalized"] for r in rows], style, label=name)
    ax.axhline(100 * b["ta_tuned"]["normalized"], color="gray", ls="--", label="TA tuned")
    ax.axhline(100 * b["iso_c_tuned"]["normalized"], color="tab:purple", ls="--", label="Iso-C tuned")
    ax.set_xticks(xs, [str(r["beta"]) for r in rows])
    ax.set_xlabel("beta (boosting cutoff; 1 = no boost)")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_title(f"equal norm ({results['suite']}, {results['size']}, {results['num_tasks']} tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--out", default="results/equal_norm", help="output directory")
    parser.add_argument("--num-tasks", type=int, default=None, help="experts merged (default: the largest count)")
    args = parser.parse_args(argv)
    results = run(size=args.size, suite=args.suite, out=args.out, seed=args.seed, cache_dir=args.cache_dir,
                  num_tasks=args.num_tasks, progress=not args.no_progress)
    print(markdown(results))


if __name__ == "__main__":
    main()
