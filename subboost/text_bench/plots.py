"""PNG plots of a text-suite result: accuracy and stable rank vs number of merged experts.

Each method has one colour; solid = plain merge, dashed = + Subspace Boosting; the experts
and the pretrained model with heads are black reference lines (solid and dotted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subboost.text_bench.report import method_label, method_names


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the text suite's plots need matplotlib: pip install 'subboost[bench]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(results, method, variant, field):
    xs, ys = [], []
    for s in results["settings"]:
        entry = s["methods"].get(method)
        if entry is not None and entry["status"] == "ok":
            xs.append(s["num_tasks"])
            ys.append(entry[variant][field])
    return xs, ys


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
    plt = _pyplot()
    counts = [s["num_tasks"] for s in results["settings"]]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for ax, field in zip(axes, ("absolute", "normalized")):
        ax.plot(counts, [100 * s["experts"][field] for s in results["settings"]], color="black", lw=2, label="experts")
        ax.plot(counts, [100 * s["pretrained"][field] for s in results["settings"]], color="black", lw=2, ls=":",
                label="pretrained + heads")
        for i, method in enumerate(method_names(results)):
            for variant, style in (("plain", "-"), ("boosted", "--")):
                xs, ys = _series(results, method, variant, field)
                ax.plot(xs, [100 * y for y in ys], ls=style, marker="o", ms=4, color=colours(i % 10),
                        label=method_label(method) + (" + boost" if variant == "boosted" else ""))
        ax.set_xticks(counts)
        ax.set_xlabel("number of merged experts")
        ax.set_title(f"{field} test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"Text suite, all-MiniLM-L6-v2 experts ({results['size']}, seed {results['seed']}): "
                 "solid = merge, dashed = + Subspace Boosting")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_stable_rank(results: dict[str, Any], path: str | Path) -> Path:
    plt = _pyplot()
    counts = [s["num_tasks"] for s in results["settings"]]
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(method_names(results)):
        for variant, style in (("plain", "-"), ("boosted", "--")):
            xs, ys = _series(results, method, variant, "stable_rank")
            ax.plot(xs, ys, ls=style, marker="o", ms=4, color=colours(i % 10),
                    label=method_label(method) + (" + boost" if variant == "boosted" else ""))
    ax.set_yscale("log")
    ax.set_xticks(counts)
    ax.set_xlabel("number of merged experts")
    ax.set_ylabel("mean stable rank of merged matrices (log scale)")
    ax.set_title(f"Rank collapse and Subspace Boosting (matrices of rank up to {results['regime']['max_rank']})")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
