"""PNG plots of a benchmark result (any suite): accuracy and stable rank vs number of experts, boosting sweep.

Each merge method has one colour; solid lines are the plain merge, dashed
lines the merge with Subspace Boosting. The pretrained model with heads and
the experts are black reference lines (dotted and solid); the legend sits
outside the axes, where it cannot hide lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subboost.bench.report import method_label, method_names


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark's plots need matplotlib: pip install 'subboost[bench]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(results: dict[str, Any], method: str, variant: str, field: str):
    xs, ys = [], []
    for s in results["settings"]:
        entry = s["methods"].get(method)
        if entry is not None and entry["status"] == "ok":
            xs.append(s["num_tasks"])
            ys.append(entry[variant][field])
    return xs, ys


def plot_accuracy(results: dict[str, Any], path: str | Path, *, suite: str = "Offline mini-benchmark") -> Path:
    """Absolute and normalized test accuracy vs number of experts, one line per method and variant."""
    plt = _pyplot()
    counts = [s["num_tasks"] for s in results["settings"]]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for ax, field, title in ((axes[0], "absolute", "absolute accuracy (%)"), (axes[1], "normalized", "normalized accuracy (%)")):
        ax.plot(counts, [100 * s["experts"][field] for s in results["settings"]], color="black", lw=2, label="experts")
        ax.plot(counts, [100 * s["pretrained"][field] for s in results["settings"]], color="black", lw=2, ls=":",
                label="pretrained + heads")
        for i, method in enumerate(method_names(results)):
            for variant, style in (("plain", "-"), ("boosted", "--")):
                xs, ys = _series(results, method, variant, field)
                label = method_label(method) + (" + boost" if variant == "boosted" else "")
                ax.plot(xs, [100 * y for y in ys], ls=style, marker="o", ms=4, color=colours(i % 10), label=label)
        ax.set_xticks(counts)
        ax.set_xlabel("number of merged experts")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)  # outside: the lines bunch together
    fig.suptitle(f"{suite} ({results['size']}, seed {results['seed']}): solid = merge, dashed = + Subspace Boosting")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_stable_rank(results: dict[str, Any], path: str | Path, *,
                     title: str = "Rank collapse and Subspace Boosting") -> Path:
    """Mean stable rank of the merged task vector vs number of experts (plain solid, boosted dashed)."""
    plt = _pyplot()
    counts = [s["num_tasks"] for s in results["settings"]]
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(method_names(results)):
        for variant, style in (("plain", "-"), ("boosted", "--")):
            xs, ys = _series(results, method, variant, "stable_rank")
            label = method_label(method) + (" + boost" if variant == "boosted" else "")
            ax.plot(xs, ys, ls=style, marker="o", ms=4, color=colours(i % 10), label=label)
    ax.set_yscale("log")
    ax.set_xticks(counts)
    ax.set_xlabel("number of merged experts")
    ax.set_ylabel("mean stable rank of merged matrices (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_boost_sweep(results: dict[str, Any], path: str | Path) -> Path:
    """Normalized accuracy and mean cutoff k against beta at the largest task count, Iso-C as a reference line."""
    plt = _pyplot()
    sweep = results["boost_sweep"]
    betas = sweep["betas"]
    positions = list(range(len(betas)))  # categorical axis: the grid has 0 and spans two decades
    fig, (ax_acc, ax_k) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, (method, rows) in enumerate(sweep["methods"].items()):
        ax_acc.plot(positions, [100 * r["normalized"] for r in rows], marker="o", color=colours(i), label=method_label(method))
        ax_k.plot(positions, [r["mean_cutoff_index"] for r in rows], marker="o", color=colours(i), label=method_label(method))
    for j, (method, entry) in enumerate(sweep.get("reference", {}).items()):
        ax_acc.axhline(100 * entry["normalized"], color=colours(len(sweep["methods"]) + j), ls="--", label=method_label(method))
    setting = results["settings"][-1]
    ax_acc.axhline(100 * setting["pretrained"]["normalized"], color="black", ls=":", label="pretrained + heads")
    for ax in (ax_acc, ax_k):
        ax.set_xticks(positions, [f"{b:g}" for b in betas])
        ax.set_xlabel("beta (1 = no boost)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_acc.set_ylabel("normalized accuracy (%)")
    ax_k.set_ylabel("mean cutoff index k")
    fig.suptitle(f"Boosting strength at {sweep['num_tasks']} tasks ({results['size']}, seed {results['seed']}); alpha tuned per beta")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_figures(results: dict[str, Any], out: str | Path, *, title: str) -> list[Path]:
    """Every plot of a result into folder ``out``: accuracy and stable rank vs experts, and the boosting sweep
    when the run made one. ``title``: the suite's (`subboost.bench.suites.Suite.title`). Returns the paths."""
    out = Path(out)
    max_rank = results.get("regime", {}).get("max_rank")
    rank_title = "Rank collapse and Subspace Boosting" + (
        f" (matrices of rank up to {max_rank})" if max_rank is not None else "")
    paths = [plot_accuracy(results, out / "accuracy_vs_tasks.png", suite=title),
             plot_stable_rank(results, out / "stable_rank_vs_tasks.png", title=rank_title)]
    if "boost_sweep" in results:
        paths.append(plot_boost_sweep(results, out / "boost_sweep.png"))
    return paths
