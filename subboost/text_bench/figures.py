"""PNG plots of a text-suite result: the vision demo's plots (`subboost.bench.figures`) with the suite's titles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subboost.bench import figures as bench_figures


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
    """Absolute and normalized test accuracy vs number of merged experts (solid plain, dashed boosted)."""
    return bench_figures.plot_accuracy(results, path, suite="Text suite, all-MiniLM-L6-v2 experts")


def plot_stable_rank(results: dict[str, Any], path: str | Path) -> Path:
    """Mean stable rank of the merged task vector vs number of experts."""
    title = f"Rank collapse and Subspace Boosting (matrices of rank up to {results['regime']['max_rank']})"
    return bench_figures.plot_stable_rank(results, path, title=title)
