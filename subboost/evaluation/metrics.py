"""Accuracy summaries of a merged model on a suite of tasks, and the score a validation search maximises.

Per task t of a suite of T tasks::

    acc_t        = (1/N_t) sum_i [argmax_c logits_t(x_i)_c == y_i]
    average      = (1/T) sum_t acc_t                         ("absolute")
    norm_t       = acc_t(merged) / acc_t(expert t)           (normalized accuracy)
    average_norm = (1/T) sum_t norm_t
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from subboost.errors import SubboostError

__all__ = ["ALPHA_METRICS", "mean_accuracy", "normalized_accuracies", "selection_score", "summarize"]

ALPHA_METRICS = ("normalized", "absolute")


def mean_accuracy(values: Iterable[float]) -> float:
    """The mean of ``values`` as a float; NaN when there are none."""
    values = [float(v) for v in values]
    return float(sum(values) / len(values)) if values else float("nan")


def normalized_accuracies(merged: Mapping[str, float], experts: Mapping[str, float]) -> dict[str, float]:
    """``merged[t] / experts[t]`` per task.

    Raises:
      SubboostError: a task without an expert accuracy, or an expert accuracy of 0.
    """
    missing = [t for t in merged if t not in experts]
    if missing:
        raise SubboostError(f"normalized accuracy needs the expert accuracy of task(s) {missing}; "
                            f"got experts for {sorted(experts)}.")
    zero = [t for t in merged if not experts[t] > 0]
    if zero:
        raise SubboostError(f"normalized accuracy: the expert accuracy of task(s) {zero} is 0, "
                            "so the ratio is undefined.")
    return {t: float(merged[t]) / float(experts[t]) for t in merged}


def selection_score(metric: str, expert_accuracies: Mapping[str, float] | None = None
                    ) -> Callable[[Mapping[str, float]], float]:
    """The validation score an alpha (and beta) sweep maximises.

    ``"absolute"``: mean accuracy. ``"normalized"`` (the reference code's
    choice): mean of ``acc_t / acc_t(expert t)`` over the tasks, with the
    experts' *validation* accuracies.
    """
    if metric == "absolute":
        return lambda accs: mean_accuracy(accs.values())
    if metric == "normalized":
        if expert_accuracies is None:
            raise SubboostError("selection_score: metric 'normalized' needs the experts' validation accuracies.")
        experts = dict(expert_accuracies)
        return lambda accs: mean_accuracy(normalized_accuracies(accs, experts).values())
    raise SubboostError(f"selection_score: metric must be one of {ALPHA_METRICS}, got {metric!r}.")


def summarize(accuracies: Mapping[str, float], expert_accuracies: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per-task accuracies, their mean, and (with experts) normalized accuracies and their mean."""
    summary: dict[str, Any] = {
        "per_task": {t: float(a) for t, a in accuracies.items()},
        "average_absolute": mean_accuracy(accuracies.values()),
    }
    if expert_accuracies is not None:
        normalized = normalized_accuracies(accuracies, expert_accuracies)
        summary["normalized"] = normalized
        summary["average_normalized"] = mean_accuracy(normalized.values())
    return summary
