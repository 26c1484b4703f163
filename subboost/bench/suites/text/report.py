"""Markdown tables of a text-suite result (the ``results.json`` dictionary).

Cells read ``absolute (normalized)`` in percent: absolute = mean test accuracy over the
merged tasks; normalized = mean over those tasks of merged / expert test accuracy.
"""

from __future__ import annotations

from typing import Any

from subboost.bench import report as bench_report
from subboost.bench.report import (accuracy_rows, alpha_mark, cell, method_rows, percent,
                                   settings_header)


def accuracy_table(results: dict[str, Any], field: str | None = None) -> str:
    """``field=None``: ``abs (norm)`` cells; ``"absolute"`` / ``"normalized"``: one number per cell."""
    render = cell if field is None else (lambda entry: percent(entry[field]))
    return "\n".join(settings_header(results) + accuracy_rows(results, render))


def choices_table(results: dict[str, Any]) -> str:
    def render(entry: dict[str, Any]) -> str:
        b = entry["boosted"]
        twins = [x for x in b.get("equivalent_betas", []) if x != b["beta"]]
        beta = f"{b['beta']:g}" + ("=" + "=".join(f"{x:g}" for x in twins) if twins else "")
        return f"{alpha_mark(entry['plain'])} ; {alpha_mark(b)} / {beta} (k {b['mean_cutoff_index']:.1f})"

    return "\n".join(settings_header(results, ": alpha ; boosted alpha / beta (k)", "---") + method_rows(results, render))


def stable_rank_table(results: dict[str, Any]) -> str:
    return bench_report.stable_rank_table(results, digits=1)


def regime_table(results: dict[str, Any]) -> str:
    r = results["regime"]
    norms = r["relative_norms"]
    lines = [
        f"- task-vector norm / pretrained norm (transformer blocks): mean {100 * r['relative_norm_mean']:.2f}% "
        f"(min {100 * min(norms):.2f}%, max {100 * max(norms):.2f}%)",
        f"- pairwise cosine between task vectors: mean {r['cosine_mean']:.3f}, max {r['cosine_max']:.3f}",
        f"- mean stable rank of one expert's task-vector matrices: {r['expert_stable_rank_mean']:.2f} "
        f"(matrices have rank up to {r['max_rank']})",
        "",
        "| task-arithmetic sum of the first T task vectors | " + " | ".join(f"T = {c}" for c in r["sum"]) + " |",
        "|---|" + "---:|" * len(r["sum"]),
        "| mean stable rank | " + " | ".join(f"{v['stable_rank']:.2f}" for v in r["sum"].values()) + " |",
    ]
    betas = list(next(iter(r["sum"].values()))["cutoff_mean"])
    for b in betas:
        lines.append(f"| boosting cutoff k at beta {b}: mean (share of matrices with k > 0) | " + " | ".join(
            f"{v['cutoff_mean'][b]:.2f} ({100 * v['cutoff_nonzero'][b]:.0f}%)" for v in r["sum"].values()) + " |")
    return "\n".join(lines)


def per_task_table(results: dict[str, Any]) -> str:
    """Per task: classes, an example sentence, pretrained + heads and expert test accuracy."""
    return bench_report.per_task_table(results, text_columns=("example",))


def markdown_tables(results: dict[str, Any]) -> str:
    """Every table (deterministic given the seed: no timings)."""
    config, model = results["config"], results["model"]
    parts = [
        f"## Text suite: size `{results['size']}`, seed {results['seed']}",
        "",
        f"all-MiniLM-L6-v2 ({model['layers']} blocks, width {model['width']}), mean-pooled, frozen cosine-prototype "
        f"heads ({config['head_shots']} sentences per class); {config['num_tasks']} generated tasks, experts "
        f"fine-tuned {config['finetune_steps']} steps (transformer blocks only, embeddings frozen); merged at "
        f"{', '.join(str(k) for k in config['task_counts'])} tasks.",
        "",
        "Test accuracy, mean over the merged tasks: absolute % (normalized % = merged / expert accuracy per task, "
        "averaged). alpha (and beta for `+ boost`) chosen on validation; `*` = alpha at the edge of the grid.",
        "",
        accuracy_table(results),
        "",
        "Normalized accuracy alone (%):",
        "",
        accuracy_table(results, "normalized"),
        "",
        "Chosen alpha (plain ; boosted) / beta, with the mean boosting cutoff index k over matrices "
        "(`a=b` = those betas give the same cutoffs):",
        "",
        choices_table(results),
        "",
        "Mean stable rank of the merged task vector's matrices, plain -> boosted:",
        "",
        stable_rank_table(results),
        "",
        "Regime of the experts:",
        "",
        regime_table(results),
        "",
        "Per task (test accuracy %):",
        "",
        per_task_table(results),
    ]
    notes = bench_report.unavailable_notes(results)
    if notes:
        parts += ["", "Not run:", *notes]
    return "\n".join(parts) + "\n"
