"""Markdown tables of a benchmark result (the ``results.json`` dictionary).

Cells read ``absolute (normalized)`` in percent: absolute = mean test accuracy
over the merged tasks; normalized = mean over those tasks of merged / expert
test accuracy. Every number is formatted from ``results.json`` by
`percent`, so the table and the JSON agree to the printed digits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

METHOD_NAMES = {
    "weight_averaging": "Weight averaging",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES",
    "dare": "DARE (TA)",
    "consensus": "Consensus TA",
    "tsv": "TSV-M",
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
}


def method_label(method: str) -> str:
    return METHOD_NAMES.get(method, method)


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
    """``0 (= 0.01 = 0.02; k 0.0)``: chosen beta, betas giving the same boost, mean cutoff index."""
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


def regime_table(results: dict[str, Any]) -> str:
    """Per task: pretrained + heads, linear probe, expert (test %), and the expert's relative task-vector norm."""
    regime = results["regime"]
    lines = ["| task | pretrained + heads | linear probe | expert | probe / expert | ||tau|| / ||theta_0|| |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = zip(results["tasks"], results["pretrained_test_accuracy"], regime["linear_probe_accuracy"],
               results["expert_test_accuracy"], regime["relative_norm"])
    for task, zs, probe, ex, norm in rows:
        lines.append(f"| {task['name']} | {percent(zs)} | {percent(probe)} | {percent(ex)} | {probe / ex:.2f} | {percent(norm)}% |")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines.append(f"| **mean** | {percent(mean(results['pretrained_test_accuracy']))} | "
                 f"{percent(mean(regime['linear_probe_accuracy']))} | {percent(mean(results['expert_test_accuracy']))} | "
                 f"{regime['probe_over_expert']:.2f} | {percent(mean(regime['relative_norm']))}% |")
    return "\n".join(lines)


def regime_summary(results: dict[str, Any]) -> str:
    regime = results["regime"]
    return (f"Linear probe / expert accuracy (means): {regime['probe_over_expert']:.2f}; task vectors: relative norm "
            f"{percent(min(regime['relative_norm']))}-{percent(max(regime['relative_norm']))}%, pairwise cosine mean "
            f"{regime['mean_cosine']:.3f} (max {regime['max_cosine']:.3f}).")


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


def markdown_tables(results: dict[str, Any]) -> str:
    """Every table (deterministic given the seed: no timings)."""
    config = results["config"]
    model = config["model"]
    parts = [
        f"## Offline mini-benchmark: size `{results['size']}`, seed {results['seed']}",
        "",
        f"ViT {model['layers']} blocks, width {model['width']}, patch {model['patch_size']} on 16x16 RGB; "
        f"{config['num_tasks']} generated tasks; experts merged at {', '.join(str(k) for k in config['task_counts'])} tasks.",
        "",
        "Test accuracy, mean over the merged tasks: absolute % (normalized % = merged / expert accuracy per task, "
        "averaged). alpha (and beta for `+ boost`) chosen on the validation split; "
        "`*` = alpha chosen at the edge of the grid.",
        "",
        accuracy_table(results),
        "",
        "Chosen alpha (plain ; boosted) / beta, and the boosting cutoff index k averaged over matrices "
        "(k = 0: every singular value raised to the largest one):",
        "",
        choices_table(results),
        "",
        "Mean stable rank of the merged task vector's matrices, plain -> boosted "
        f"(every matrix has rank at most the width, {model['width']}):",
        "",
        stable_rank_table(results),
        "",
        "Per task (test accuracy %):",
        "",
        per_task_table(results),
    ]
    if "regime" in results:
        parts += [
            "",
            "Regime (compare with CLIP: linear probes near fine-tuned accuracy, task vectors a few % of the weights, "
            "nearly orthogonal). Linear probe = logistic regression on the frozen pretrained features:",
            "",
            regime_table(results),
            "",
            regime_summary(results),
        ]
    if "boost_sweep" in results:
        parts += [
            "",
            f"Boosting strength at {results['boost_sweep']['num_tasks']} tasks (alpha tuned on validation per beta; "
            "mean k = cutoff index averaged over matrices, k = 0 flattens the whole spectrum, beta = 1 leaves it as it is):",
            "",
            sweep_table(results),
        ]
    notes = unavailable_notes(results)
    if notes:
        parts += ["", "Not run:", *notes]
    return "\n".join(parts) + "\n"


def wall_time_line(results: dict[str, Any], *, cached: str = "reused cached models",
                   trained: str = "trained the models") -> str:
    """The run's wall time, and whether it trained its models or reused cached ones."""
    cache = cached if results["cache_hit"] else trained
    return f"\nWall time {results['timings'].get('total_s', float('nan')):.0f} s ({cache}).\n"


def markdown_report(results: dict[str, Any]) -> str:
    """`markdown_tables` plus the run's wall time."""
    return markdown_tables(results) + wall_time_line(results)
