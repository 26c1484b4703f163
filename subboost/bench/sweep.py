"""Choosing alpha (and beta) on the validation split of the mini-benchmarks.

For each merged task vector the candidates are ``{None: tau}`` (no boosting)
or ``{beta: boost(tau, beta)}`` for every beta of the grid (boosting commutes
with the scaling by alpha, so one boost per beta serves the whole alpha sweep).
Selection maximises the mean validation accuracy over the merged tasks by the
library's one rule (`subboost.selection`): every candidate on the coarse log
grid ``alphas`` (one vmapped call each), ties to the earlier (candidate,
alpha), then refinement at ``alpha * 2^(-1/2)`` and ``alpha * 2^(1/2)`` (ties
keep the coarse value). A choice at either end of the coarse grid is flagged
(``alpha_on_edge``). Methods with a fixed alpha only choose among the candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from subboost.selection import choose

__all__ = ["REFINE_FACTORS", "Selection", "select"]

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
    choice = choose(lambda key, a: np.asarray(evaluate(candidates[key], a)).mean(axis=1), list(candidates),
                    alphas=grid, refine_factors=() if fixed_alpha is not None else REFINE_FACTORS)
    return Selection(choice.key, choice.alpha, choice.alpha_on_edge, choice.score, choice.evaluations)
