"""Markdown tables of a benchmark result (the ``results.json`` dictionary).

Cells read ``absolute (normalized)`` in percent: absolute = mean test accuracy
over the merged tasks; normalized = mean over those tasks of merged / expert
test accuracy. Every number is formatted from ``results.json`` by
`percent`, so the table and the JSON agree to the printed digits.
"""

from __future__ import annotations

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


def accuracy_table(results: dict[str, Any]) -> str:
    settings = results["settings"]
    header = "| method | " + " | ".join(f"{s['num_tasks']} tasks" for s in settings) + " |"
    lines = [header, "|---|" + "---:|" * len(settings)]
    lines.append("| Pretrained + heads | " + " | ".join(cell(s["pretrained"]) for s in settings) + " |")
    lines.append("| Fine-tuned experts | " + " | ".join(cell(s["experts"]) for s in settings) + " |")
    for method in method_names(results):
        for variant, label in (("plain", method_label(method)), ("boosted", f"{method_label(method)} + boost")):
            cells = []
            for s in settings:
                entry = s["methods"].get(method)
                if entry is None or entry["status"] != "ok":
                    cells.append("n/a")
                    continue
                mark = "*" if entry[variant]["alpha_on_edge"] else ""
                cells.append(cell(entry[variant]) + mark)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _betas(boosted: dict[str, Any]) -> str:
    """``0 (= 0.01 = 0.02; k 0.0)``: chosen beta, betas giving the same boost, mean cutoff index."""
    twins = [b for b in boosted.get("equivalent_betas", []) if b != boosted["beta"]]
    notes = []
    if twins:
        notes.append("= " + " = ".join(f"{b:g}" for b in twins))
    if "mean_cutoff_index" in boosted:
        notes.append(f"k {boosted['mean_cutoff_index']:.1f}")
    return f"{boosted['beta']:g}" + (f" ({'; '.join(notes)})" if notes else "")


def choices_table(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = ["| method | " + " | ".join(f"{s['num_tasks']} tasks: alpha / beta" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for method in method_names(results):
        cells = []
        for s in settings:
            entry = s["methods"].get(method)
            if entry is None or entry["status"] != "ok":
                cells.append("n/a")
                continue
            plain, boosted = entry["plain"], entry["boosted"]
            cells.append(f"{plain['alpha']:.3g}{'*' if plain['alpha_on_edge'] else ''}"
                         f" ; boost {boosted['alpha']:.3g}{'*' if boosted['alpha_on_edge'] else ''}"
                         f" / {_betas(boosted)}")
        lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stable_rank_table(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = ["| method | " + " | ".join(f"{s['num_tasks']} tasks" for s in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    for method in method_names(results):
        cells = []
        for s in settings:
            entry = s["methods"].get(method)
            if entry is None or entry["status"] != "ok":
                cells.append("n/a")
                continue
            cells.append(f"{entry['plain']['stable_rank']:.2f} -> {entry['boosted']['stable_rank']:.2f}")
        lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(results: dict[str, Any]) -> str:
    lines = ["| task | classes | pretrained + heads | expert |", "|---|---:|---:|---:|"]
    for task, zs, ex in zip(results["tasks"], results["pretrained_test_accuracy"], results["expert_test_accuracy"]):
        lines.append(f"| {task['name']} | {task['num_classes']} | {percent(zs)} | {percent(ex)} |")
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


def markdown_report(results: dict[str, Any]) -> str:
    """`markdown_tables` plus the run's wall time."""
    timings = results["timings"]
    cache = "reused cached models" if results["cache_hit"] else "trained the models"
    return markdown_tables(results) + f"\nWall time {timings.get('total_s', float('nan')):.0f} s ({cache}).\n"
