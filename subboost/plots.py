"""PNG figures of the HO-GSVD and rank-collapse analyses (optional ``viz`` extra: matplotlib).

Every ``plot_*`` function draws from plain numbers, writes ``path`` (PNG) and
``path`` with suffix ``.json`` holding exactly the numbers drawn, and returns
that data as a dict. Figures are built with matplotlib's object-oriented API on
an Agg canvas, so no global backend or pyplot state is touched.

- `plot_gsv_distributions`: generalized singular values per expert plus a merged reference.
- `plot_alignment`: alignment heatmap with expert names.
- `plot_rank_collapse`: stable and energy rank vs number of merged experts, per layer type.
- `plot_spectra_evolution`: normalised singular-value spectra as experts are added.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from subboost.analysis import RankCollapse, layer_type
from subboost.errors import SubboostError

QUANTILES: dict[str, float] = {"min": 0.0, "p5": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("subboost plots need matplotlib: pip install 'subboost[viz]'.") from err
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite_list(x: Any) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise SubboostError("plot data contains NaN or infinite values.")
    return arr.tolist()


def _save(fig, path: str | os.PathLike, data: dict[str, Any]) -> dict[str, Any]:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise SubboostError(f"plot path must end in .png, got {path!r}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    with open(path[:-4] + ".json", "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
    return data


def json_path(png_path: str | os.PathLike) -> str:
    """Where ``plot_*(…, png_path)`` writes its numbers."""
    return os.fspath(png_path)[:-4] + ".json"


# ----------------------------------------------------------------------------
# Generalized singular values
# ----------------------------------------------------------------------------
def pool_generalized_singular_values(
    sigmas: Mapping[str, Any], names: Sequence[str], *, num_experts: int | None = None
) -> dict[str, np.ndarray]:
    """Pools per-layer ``sigma (..., K, n)`` into one value array per row name.

    Directions in which every expert (the first ``num_experts`` rows; default
    all) has ``sigma = 0`` -- the common null space of a rank-deficient layer --
    are dropped: they carry no expert.
    """
    names = list(names)
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for path, sigma in sigmas.items():
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.shape[-2] != len(names):
            raise SubboostError(f"{path!r}: sigma has {sigma.shape[-2]} rows but {len(names)} names were given.")
        sigma = np.moveaxis(sigma, -2, 0).reshape(len(names), -1)
        present = np.any(sigma[: num_experts or len(names)] > 0, axis=0)
        for name, row in zip(names, sigma):
            pooled[name].append(row[present])
    return {name: np.concatenate(v) for name, v in pooled.items()}


def plot_gsv_distributions(
    values: Mapping[str, Any], path: str | os.PathLike, *, bins: int = 40, title: str | None = None
) -> dict[str, Any]:
    """Distributions of generalized singular values, one per expert (and the merged reference).

    Left: box plots (box p25..p75, line median, whiskers p5..p95, dots min/max);
    right: density histograms over shared bins.

    Args:
      values: ``{row name: 1-D values}``, e.g. from `pool_generalized_singular_values`.
      path: output PNG.
      bins: histogram bins.
      title: figure title.

    Returns:
      ``{"names", "stats": {name: {min, p5, p25, median, p75, p95, max, mean, count}},
      "bin_edges", "density": {name: [...]}}``.
    """
    names = list(values)
    if not names:
        raise SubboostError("plot_gsv_distributions: no values to plot.")
    arrays = {name: np.asarray(values[name], dtype=np.float64).ravel() for name in names}
    for name, arr in arrays.items():
        if arr.size == 0:
            raise SubboostError(f"plot_gsv_distributions: no values for {name!r}.")
    upper = max(float(a.max()) for a in arrays.values())
    edges = np.linspace(0.0, upper if upper > 0 else 1.0, bins + 1)
    stats, density = {}, {}
    for name, arr in arrays.items():
        q = np.quantile(arr, list(QUANTILES.values()))
        stats[name] = {key: float(v) for key, v in zip(QUANTILES, q)}
        stats[name].update(mean=float(arr.mean()), count=int(arr.size))
        density[name] = np.histogram(arr, bins=edges, density=True)[0]
    data = {
        "names": names,
        "stats": stats,
        "bin_edges": _finite_list(edges),
        "density": {name: _finite_list(d) for name, d in density.items()},
    }

    fig = _figure(max(8.0, 0.6 * len(names) + 6.0), 4.2)
    ax_box, ax_hist = fig.subplots(1, 2, width_ratios=[max(1.0, len(names) / 6), 1.0])
    boxes = [
        {"label": name, "whislo": s["p5"], "q1": s["p25"], "med": s["median"], "q3": s["p75"], "whishi": s["p95"],
         "fliers": [s["min"], s["max"]], "mean": s["mean"]}
        for name, s in stats.items()
    ]
    ax_box.bxp(boxes, showmeans=True, showfliers=True)
    ax_box.set_ylabel("generalized singular value $\\sigma_{i,k}$")
    ax_box.tick_params(axis="x", labelrotation=45)
    ax_box.set_title("per expert (whiskers p5-p95, dots min/max)")
    centers = 0.5 * (edges[:-1] + edges[1:])
    colors = _colors(len(names))
    for name, color in zip(names, colors):
        ax_hist.plot(centers, density[name], drawstyle="steps-mid", color=color, label=name,
                     linewidth=2.0 if name.startswith("merged") else 1.0)
    ax_hist.set_xlabel("$\\sigma$")
    ax_hist.set_ylabel("density")
    ax_hist.legend(fontsize="small", ncols=1 + len(names) // 12)
    fig.suptitle(title or "HO-GSVD generalized singular values")
    return _save(fig, path, data)


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


# ----------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------
def plot_alignment(
    matrix: Any, names: Sequence[str], path: str | os.PathLike, *, title: str | None = None
) -> dict[str, Any]:
    """Heatmap of an alignment matrix (`subboost.alignment_matrix`) with expert names.

    Returns:
      ``{"names", "matrix"}``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    names = list(names)
    if matrix.ndim != 2 or matrix.shape != (len(names), len(names)):
        raise SubboostError(f"plot_alignment: matrix of shape {matrix.shape} does not fit {len(names)} names.")
    data = {"names": names, "matrix": _finite_list(matrix)}
    size = max(4.5, 0.45 * len(names) + 2.5)
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
                        color="black" if matrix[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="alignment")
    ax.set_title(title or "HO-GSVD alignment")
    return _save(fig, path, data)


# ----------------------------------------------------------------------------
# Rank collapse
# ----------------------------------------------------------------------------
def _curves(result: RankCollapse, metric: str) -> dict[str, dict[str, list[float]]]:
    out = {}
    for kind, values in result.by_layer_type(metric).items():
        out[kind] = {"mean": _finite_list(values.mean(axis=1)), "min": _finite_list(values.min(axis=1)),
                     "max": _finite_list(values.max(axis=1))}
    return out


def _short_names(types: Sequence[str]) -> dict[str, str]:
    """Drops the path prefix every layer type shares."""
    parts = [t.split("/") for t in types]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {t: "/".join(p[common:]) for t, p in zip(types, parts)}


def plot_rank_collapse(result: RankCollapse, path: str | os.PathLike, *, title: str | None = None) -> dict[str, Any]:
    """Stable rank and energy rank of the merged task vector vs number of merged experts.

    One line per layer type (mean over its layers, band min..max); a second
    column shows the same after Subspace Boosting when ``result.beta`` is set.

    Returns:
      ``{"num_experts", "method", "beta", "fraction", "layer_types": {type:
      {metric: {"mean", "min", "max"}}}, "layers": {path: {metric: values}}}``
      with metrics ``stable_rank``, ``energy_rank`` and, with boosting,
      ``stable_rank_boosted``, ``energy_rank_boosted``.
    """
    metrics = ["stable_rank", "energy_rank"]
    if result.beta is not None:
        metrics += ["stable_rank_boosted", "energy_rank_boosted"]
    curves = {metric: _curves(result, metric) for metric in metrics}
    types = list(curves["stable_rank"])
    data = {
        "num_experts": list(result.num_experts),
        "method": result.method,
        "beta": result.beta,
        "fraction": result.fraction,
        "layer_types": {t: {metric: curves[metric][t] for metric in metrics} for t in types},
        "layers": {
            p: {metric: _finite_list(getattr(result, metric)[p]) for metric in metrics} for p in result.stable_rank
        },
    }

    from matplotlib.ticker import MaxNLocator

    short = _short_names(types)
    columns = 2 if result.beta is not None else 1
    fig = _figure(5.5 * columns + 2.0, 7.0)
    axes = np.asarray(fig.subplots(2, columns, sharex=True, sharey="row", squeeze=False))
    x = np.asarray(result.num_experts)
    colors = _colors(len(types))
    for col in range(columns):
        for row, base in enumerate(["stable_rank", "energy_rank"]):
            metric = base + ("_boosted" if col == 1 else "")
            ax = axes[row, col]
            for t, color in zip(types, colors):
                c = curves[metric][t]
                ax.plot(x, c["mean"], marker="o", markersize=3, color=color, label=short[t])
                ax.fill_between(x, c["min"], c["max"], color=color, alpha=0.15)
            label = "stable rank" if base == "stable_rank" else f"energy rank ({result.fraction:g})"
            ax.set_ylabel(label)
            ax.set_title(f"{result.method}" + (f" + boost (beta={result.beta:g})" if col == 1 else ""))
            ax.grid(alpha=0.3)
            ax.yaxis.get_major_formatter().set_useOffset(False)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == 1:
                ax.set_xlabel("number of merged experts")
    axes[0, -1].legend(fontsize="small", loc="best")
    fig.suptitle(title or "Rank collapse: merged task vector vs number of experts")
    return _save(fig, path, data)


def plot_spectra_evolution(
    result: RankCollapse, path: str | os.PathLike, *, boosted: bool = False, title: str | None = None
) -> dict[str, Any]:
    """Normalised singular values ``s_i / s_0`` of the merged task vector per layer type, one line per expert count.

    Spectra of the layers of one type are averaged (zero matrices count as
    zero spectra).

    Returns:
      ``{"num_experts", "method", "boosted", "layer_types": {type: [[s_i/s_0 for i] for each count]}}``.
    """
    spectra = result.spectra_boosted if boosted else result.spectra
    if spectra is None:
        raise SubboostError("plot_spectra_evolution: boosted spectra need a RankCollapse computed with beta.")
    grouped: dict[str, list[np.ndarray]] = {}
    for p, s in spectra.items():
        s = np.asarray(s, dtype=np.float64)
        s = s.reshape(s.shape[0], -1, s.shape[-1])  # (counts, matrices, r)
        s0 = s[..., :1]
        grouped.setdefault(layer_type(p), []).append(np.where(s0 > 0, s / np.where(s0 > 0, s0, 1.0), 0.0))
    normalised = {t: np.concatenate(v, axis=1).mean(axis=1) for t, v in grouped.items()}
    data = {
        "num_experts": list(result.num_experts),
        "method": result.method,
        "boosted": boosted,
        "layer_types": {t: _finite_list(v) for t, v in normalised.items()},
    }

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    types = list(normalised)
    short = _short_names(types)
    cols = min(3, len(types))
    rows = math.ceil(len(types) / cols)
    fig = _figure(4.2 * cols + 1.0, 3.2 * rows)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    counts = np.asarray(result.num_experts)
    norm = Normalize(vmin=counts.min(), vmax=max(counts.max(), counts.min() + 1))
    cmap = colormaps["viridis"]
    for ax, t in zip(axes, types):
        for n, spectrum in zip(counts, normalised[t]):
            positive = np.where(spectrum > 0, spectrum, np.nan)  # log axis: hide exact zeros
            ax.plot(np.arange(1, spectrum.size + 1), positive, color=cmap(norm(n)), linewidth=1.0)
        ax.set_yscale("log")
        ax.set_title(short[t], fontsize="small")
        ax.set_xlabel("index i")
        ax.set_ylabel("$s_i / s_0$")
        ax.grid(alpha=0.3)
    for ax in axes[len(types):]:
        ax.set_visible(False)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[: len(types)]), label="merged experts")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(title or f"Spectra of the merged task vector ({result.method}{', boosted' if boosted else ''})")
    return _save(fig, path, data)
