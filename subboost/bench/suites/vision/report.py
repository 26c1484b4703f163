"""The vision suite's report: its header and regime tables around the harness's tables (`subboost.bench.report`)."""

from __future__ import annotations

from typing import Any

from subboost.bench.report import (accuracy_table, choices_table, per_task_table, percent, stable_rank_table,
                                   sweep_table, unavailable_notes)


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
