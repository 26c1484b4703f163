"""Choosing alpha (and beta) on the validation split.

For each merged task vector the candidates are ``{None: tau}`` (no boosting)
or ``{beta: boost(tau, beta)}`` for every beta of the grid (boosting commutes
with the scaling by alpha, so one boost per beta serves the whole alpha sweep).
Selection maximises the mean validation accuracy over the merged tasks:

1. every candidate on the coarse log grid ``alphas`` (one vmapped call each);
2. the best (candidate, alpha) pair, ties to the earlier one;
3. refinement: that candidate at ``alpha * 2^(-1/2)`` and ``alpha * 2^(1/2)``;
   the best of the three wins (ties keep the coarse value).

A choice at either end of the coarse grid is flagged (``alpha_on_edge``): the
optimum may lie outside the grid. Methods with a fixed alpha skip 1-3 and only
choose among the candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# evaluate(task vector, alphas (A,)) -> validation accuracies (A, T)
EvaluateFn = Callable[[Any, np.ndarray], np.ndarray]
REFINE_FACTORS = (2**-0.5, 2**0.5)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen setting of one merged task vector.

    Attributes:
      candidate: the chosen key of the candidates (a beta, or None).
      alpha: the chosen scaling.
      alpha_on_edge: the coarse optimum sat at the end of the grid.
      val_accuracy: mean validation accuracy at the choice.
      evaluations: how many (candidate, alpha) settings were evaluated.
    """

    candidate: Any
    alpha: float
    alpha_on_edge: bool
    val_accuracy: float
    evaluations: int


def select(
    evaluate: EvaluateFn,
    candidates: Mapping[Any, Any],
    *,
    alphas: Sequence[float],
    fixed_alpha: float | None = None,
) -> Selection:
    """Picks (candidate, alpha) maximising mean validation accuracy (see the module docstring)."""
    if not candidates:
        raise ValueError("select needs at least one candidate task vector.")
    grid = np.asarray([fixed_alpha] if fixed_alpha is not None else alphas, np.float32)
    if grid.size == 0:
        raise ValueError("select needs a non-empty alpha grid.")
    best = None  # (val, candidate, index)
    for candidate, tau in candidates.items():
        scores = np.asarray(evaluate(tau, grid)).mean(axis=1)
        index = int(np.argmax(scores))
        if best is None or scores[index] > best[0]:
            best = (float(scores[index]), candidate, index)
    val, candidate, index = best
    alpha = float(grid[index])
    evaluations = len(candidates) * grid.size
    if fixed_alpha is not None:
        return Selection(candidate, alpha, False, val, evaluations)
    refined = np.asarray([alpha * f for f in REFINE_FACTORS], np.float32)
    scores = np.asarray(evaluate(candidates[candidate], refined)).mean(axis=1)
    if scores.max() > val:
        alpha, val = float(refined[int(np.argmax(scores))]), float(scores.max())
    on_edge = index in (0, grid.size - 1)
    return Selection(candidate, alpha, on_edge, val, evaluations + refined.size)
