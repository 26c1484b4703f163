"""Markdown tables of a benchmark result (the ``results.json`` dictionary).

Cells read ``absolute (normalized)`` in percent: absolute = mean test accuracy
over the merged tasks; normalized = mean over those tasks of merged / expert
test accuracy. Every number is formatted from ``results.json`` by
`percent`, so the table and the JSON agree to the printed digits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from subboost.merging.registry import METHODS

def method_label(method: str) -> str:
    """The method's display name from its registry record (`subboost.merging.registry.MergeMethod.label`)."""
    record = METHODS.get(method)
    return method if record is None else record.label


def percent(x: float) -> str:
    return f"{100 * x:.1f}"


def cell(entry: dict[str, float]) -> str:
    return f"{percent(entry['absolute'])} ({percent(entry['normalized'])})"


def method_names(results: dict[str, Any]) -> list[str]:
    """Methods in the order they were run (union over settings)."""
    names: list[str] = []
    for setting in results["settings"]:
        names += [m for m in setting["methods"] if m not in names]
    return names


def ok_entry(setting: dict[str, Any], method: str) -> dict[str, Any] | None:
    """The method's entry at one task count, or None where it did not run (n/a)."""
    entry = setting["methods"].get(method)
    return entry if entry is not None and entry["status"] == "ok" else None


def settings_header(results: dict[str, Any], suffix: str = "", align: str = "---:") -> list[str]:
    """The header of a table with one column per task count."""
    settings = results["settings"]
    return ["| method | " + " | ".join(f"{s['num_tasks']} tasks{suffix}" for s in settings) + " |",
            "|---|" + f"{align}|" * len(settings)]


def _cells(results: dict[str, Any], method: str, render: Callable[[dict[str, Any]], str]) -> str:
    return " | ".join("n/a" if (e := ok_entry(s, method)) is None else render(e) for s in results["settings"])


def method_rows(results: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> list[str]:
    """One row per method: ``render(entry)`` per task count, ``n/a`` where the method did not run."""
    return [f"| {method_label(m)} | {_cells(results, m, render)} |" for m in method_names(results)]


def accuracy_rows(results: dict[str, Any], render: Callable[[dict[str, Any]], str] = cell) -> list[str]:
    """Pretrained, experts, then every method plain and boosted (``*``: alpha at the edge of its grid)."""
    settings = results["settings"]
    lines = ["| Pretrained + heads | " + " | ".join(render(s["pretrained"]) for s in settings) + " |",
             "| Fine-tuned experts | " + " | ".join(render(s["experts"]) for s in settings) + " |"]
    for method in method_names(results):
        for variant, suffix in (("plain", ""), ("boosted", " + boost")):
            marked = lambda e, v=variant: render(e[v]) + ("*" if e[v]["alpha_on_edge"] else "")  # noqa: E731
            lines.append(f"| {method_label(method)}{suffix} | {_cells(results, method, marked)} |")
    return lines


def accuracy_table(results: dict[str, Any]) -> str:
    return "\n".join(settings_header(results) + accuracy_rows(results))


def _betas(boosted: dict[str, Any]) -> str:
    """``0 (= 0.02; k 0.0)``: chosen beta, betas giving the same boost, mean cutoff index."""
    twins = [b for b in boosted.get("equivalent_betas", []) if b != boosted["beta"]]
    notes = []
    if twins:
        notes.append("= " + " = ".join(f"{b:g}" for b in twins))
    if "mean_cutoff_index" in boosted:
        notes.append(f"k {boosted['mean_cutoff_index']:.1f}")
    return f"{boosted['beta']:g}" + (f" ({'; '.join(notes)})" if notes else "")


def alpha_mark(entry: dict[str, Any]) -> str:
    """The chosen alpha, ``*`` when at the edge of its grid."""
    return f"{entry['alpha']:.3g}{'*' if entry['alpha_on_edge'] else ''}"


def choices_table(results: dict[str, Any]) -> str:
    return "\n".join(settings_header(results, ": alpha / beta", "---") + method_rows(
        results, lambda e: f"{alpha_mark(e['plain'])} ; boost {alpha_mark(e['boosted'])} / {_betas(e['boosted'])}"))


def stable_rank_table(results: dict[str, Any], digits: int = 2) -> str:
    return "\n".join(settings_header(results) + method_rows(
        results, lambda e: f"{e['plain']['stable_rank']:.{digits}f} -> {e['boosted']['stable_rank']:.{digits}f}"))


def per_task_table(results: dict[str, Any], *, text_columns: tuple[str, ...] = ()) -> str:
    """Per task: classes, any ``text_columns`` of its record, pretrained + heads and expert test accuracy."""
    lines = ["| " + " | ".join(["task", "classes", *text_columns, "pretrained + heads", "expert"]) + " |",
             "|---|---:|" + "---|" * len(text_columns) + "---:|---:|"]
    for task, zs, ex in zip(results["tasks"], results["pretrained_test_accuracy"], results["expert_test_accuracy"]):
        cells = [task["name"], str(task["num_classes"]), *(str(task[c]) for c in text_columns), percent(zs), percent(ex)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: dict[str, Any]) -> str:
    """Boosting strength at the largest task count: one row per beta, ``abs (norm) k`` per method."""
    sweep = results["boost_sweep"]
    methods = list(sweep["methods"])
    lines = ["| beta | " + " | ".join(f"{method_label(m)}: acc (norm) | alpha | mean k" for m in methods) + " |",
             "|---:|" + "---:|---:|---:|" * len(methods)]
    for i, beta in enumerate(sweep["betas"]):
        cells = []
        for m in methods:
            row = sweep["methods"][m][i]
            cells += [cell(row) + ("*" if row["alpha_on_edge"] else ""), f"{row['alpha']:.3g}", f"{row['mean_cutoff_index']:.1f}"]
        lines.append(f"| {beta:g}{' (no boost)' if beta == 1 else ''} | " + " | ".join(cells) + " |")
    for m, entry in sweep.get("reference", {}).items():
        lines.append(f"\n{method_label(m)} at {sweep['num_tasks']} tasks (flat spectrum by construction): {cell(entry)}.")
    return "\n".join(lines)


def unavailable_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for s in results["settings"]:
        for method, entry in s["methods"].items():
            if entry["status"] != "ok":
                notes.append(f"- {method_label(method)} at {s['num_tasks']} tasks: n/a ({entry['reason']})")
    return notes


def wall_time_line(results: dict[str, Any], *, cached: str = "reused cached models",
                   trained: str = "trained the models") -> str:
    """The run's wall time, and whether it trained its models or reused cached ones."""
    cache = cached if results["cache_hit"] else trained
    return f"\nWall time {results['timings'].get('total_s', float('nan')):.0f} s ({cache}).\n"


def markdown_report(results: dict[str, Any]) -> str:
    """The suite's tables (`subboost.bench.suites.Suite.markdown_tables`) plus the run's wall time.

    ``results`` without a ``suite`` entry (written before suites had names) are the vision suite's.
    """
    from subboost.bench.suites import get_suite

    suite = get_suite(results.get("suite", "vision"))
    return suite.markdown_tables(results) + wall_time_line(results, cached=suite.cached_words,
                                                           trained=suite.trained_words)


# ----------------------------------------------------------------------------
# Several seeds: mean +- sd
# ----------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "sd": sd}


def _pm(stats: dict[str, float]) -> str:
    return f"{percent(stats['mean'])} ± {percent(stats['sd'])}"


def seed_summary(paths: Sequence[str | Path]) -> tuple[str, dict[str, Any]]:
    """Mean +- sd over seeds of the accuracy tables of several runs' ``results.json`` files.

    The runs must be of one suite and size (the same task counts and methods); they usually differ in
    the seed only. Every accuracy (absolute and normalized, plain and boosted, and the boosting sweep's
    rows when every run has one) is summarised by its mean and sample standard deviation over the runs.

    Args:
      paths: the runs' ``results.json`` files (e.g. ``OUT/seed0/results.json``, ... from
        ``subboost demo --seeds 0,1,2``).

    Returns:
      ``(markdown, summary)``: the tables, and a JSON-serialisable dict with ``seeds``, ``runs``
      (the paths), ``suite``, ``size`` and, per task count, ``{row: {"absolute": {"mean", "sd"},
      "normalized": {...}}}``.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("seed_summary: no results.json files given.")
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise ValueError(f"seed_summary: cannot read {path} as results.json ({err}).") from err
    first = runs[0]
    suite, size = first.get("suite", "vision"), first["size"]
    counts = [s["num_tasks"] for s in first["settings"]]
    for path, run in zip(paths, runs):
        if run.get("suite", "vision") != suite or run["size"] != size or [s["num_tasks"] for s in run["settings"]] != counts:
            raise ValueError(f"seed_summary: {path} is a {run.get('suite', 'vision')} run of size {run['size']} at "
                             f"{[s['num_tasks'] for s in run['settings']]} tasks; {paths[0]} is a {suite} run of size "
                             f"{size} at {counts} tasks.")
    seeds = [run["seed"] for run in runs]
    methods = [m for m in method_names(first) if all(m in method_names(r) for r in runs)]

    def stats(pick: Callable[[dict[str, Any]], dict[str, float] | None]) -> dict[str, Any] | None:
        entries = [pick(run) for run in runs]
        if any(e is None for e in entries):  # n/a in some run
            return None
        return {field: _mean_sd([e[field] for e in entries]) for field in ("absolute", "normalized")}

    settings: dict[str, Any] = {}
    for i, count in enumerate(counts):
        rows: dict[str, Any] = {
            "pretrained": stats(lambda r, i=i: r["settings"][i]["pretrained"]),
            "experts": stats(lambda r, i=i: r["settings"][i]["experts"]),
        }
        for method in methods:
            for variant in ("plain", "boosted"):
                def pick(r, i=i, m=method, v=variant):
                    entry = ok_entry(r["settings"][i], m)
                    return None if entry is None else entry[v]
                rows[f"{method}/{variant}"] = stats(pick)
        settings[str(count)] = rows
    summary: dict[str, Any] = {"suite": suite, "size": size, "seeds": seeds, "runs": [str(p) for p in paths],
                               "settings": settings}

    def cell_of(entry: dict[str, Any] | None) -> str:
        return "n/a" if entry is None else f"{_pm(entry['absolute'])} ({_pm(entry['normalized'])})"

    header = ["| method | " + " | ".join(f"{c} tasks" for c in counts) + " |", "|---|" + "---:|" * len(counts)]
    lines = [f"## {suite} suite, size `{size}`: mean ± sd over seeds {', '.join(map(str, seeds))}", "",
             "Test accuracy, mean over the merged tasks: absolute % (normalized %), each as mean ± sample standard "
             "deviation over the runs; alpha (and beta) chosen on validation in every run.", "", *header]
    labels = {"pretrained": "Pretrained + heads", "experts": "Fine-tuned experts"}
    labels.update({f"{m}/{v}": method_label(m) + (" + boost" if v == "boosted" else "")
                   for m in methods for v in ("plain", "boosted")})
    for key, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(cell_of(settings[str(c)][key]) for c in counts) + " |")
    if all("boost_sweep" in r for r in runs) and len({tuple(r["boost_sweep"]["betas"]) for r in runs}) == 1:
        sweep = first["boost_sweep"]
        sweep_methods = [m for m in sweep["methods"] if all(m in r["boost_sweep"]["methods"] for r in runs)]
        summary["boost_sweep"] = {"num_tasks": sweep["num_tasks"], "betas": sweep["betas"], "methods": {
            m: [stats(lambda r, m=m, j=j: r["boost_sweep"]["methods"][m][j]) for j in range(len(sweep["betas"]))]
            for m in sweep_methods}}
        lines += ["", f"Boosting strength at {sweep['num_tasks']} tasks (alpha tuned per beta), mean ± sd:", "",
                  "| beta | " + " | ".join(method_label(m) for m in sweep_methods) + " |",
                  "|---:|" + "---:|" * len(sweep_methods)]
        for j, beta in enumerate(sweep["betas"]):
            lines.append(f"| {beta:g} | " + " | ".join(cell_of(summary["boost_sweep"]["methods"][m][j])
                                                       for m in sweep_methods) + " |")
    return "\n".join(lines) + "\n", summary
