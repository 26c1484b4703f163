"""PNG plots of a benchmark result: accuracy and stable rank vs number of experts.

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


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
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
    fig.suptitle(f"Offline mini-benchmark ({results['size']}, seed {results['seed']}): solid = merge, dashed = + Subspace Boosting")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_stable_rank(results: dict[str, Any], path: str | Path) -> Path:
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
    ax.set_title("Rank collapse and Subspace Boosting")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
