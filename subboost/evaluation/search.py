"""The validation search over the task-vector scale alpha and Subspace Boosting's beta.

The chosen setting is then scored on the test split::

    for beta in betas:                   # None = no boosting
        tau_b = subspace_boost(tau, beta=beta)          # every beta from one SVD (subspace_boost_sweep)
        for alpha in alphas:
            theta = theta_0 + alpha * tau_b          # boost(a tau) = a boost(tau)
            score = mean_t acc_t(theta, validation)
    pick the first (beta, alpha) with the highest score   # `subboost.selection`

Subspace Boosting commutes with positive scaling, so boosting once per beta
serves the whole alpha sweep; no SVD runs inside the alpha loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from subboost.errors import SubboostError
from subboost.evaluation.metrics import selection_score
from subboost.selection import check_grid, choose
from subboost.tree import PyTree

__all__ = ["SweepPoint", "SweepResult", "select_alpha_beta"]


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """Validation accuracies of ``theta_0 + alpha * boost(tau, beta)`` (``beta=None``: no boost)."""

    alpha: float
    beta: float | None
    accuracies: Mapping[str, float]
    score: float


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """The chosen setting and every evaluated point.

    ``alpha_on_edge`` flags a chosen alpha at either end of a grid of more than
    one value: the optimum may lie outside the grid.
    """

    alpha: float
    beta: float | None
    score: float
    points: tuple[SweepPoint, ...]
    alphas: tuple[float, ...]
    betas: tuple[float | None, ...]

    @property
    def alpha_on_edge(self) -> bool:
        return len(self.alphas) > 1 and self.alpha in (min(self.alphas), max(self.alphas))

    @property
    def best(self) -> SweepPoint:
        return next(p for p in self.points if p.alpha == self.alpha and p.beta == self.beta)

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "score": self.score,
            "alpha_on_grid_edge": self.alpha_on_edge,
            "alphas": list(self.alphas),
            "betas": list(self.betas),
            "points": [dataclasses.asdict(p) | {"accuracies": dict(p.accuracies)} for p in self.points],
        }


def select_alpha_beta(
    pretrained: PyTree,
    tau: PyTree,
    evaluate: Callable[[PyTree], Mapping[str, float]],
    *,
    alphas: Sequence[float],
    betas: Sequence[float | None] = (None,),
    boost_kwargs: Mapping[str, Any] | None = None,
    score: Callable[[Mapping[str, float]], float] | None = None,
    progress: bool = True,
    description: str = "sweep",
) -> SweepResult:
    """Chooses ``(alpha, beta)`` maximising a validation score.

    Args:
      pretrained: ``theta_0``.
      tau: the merged task vector (before boosting and scaling).
      evaluate: ``params -> {task: validation accuracy}``.
      alphas: scaling coefficients to try (positive).
      betas: Subspace Boosting cutoffs to try; ``None`` means no boosting.
      boost_kwargs: extra arguments of `subboost.subspace_boost` (mode, attention, ...).
      score: ``accuracies -> float`` to maximise; default the mean accuracy.
      progress: show a tqdm bar.
      description: the bar's label.

    Returns:
      A `SweepResult`. The choice follows the library's one selection rule
      (`subboost.selection.choose`): ties go to the first point in (beta,
      alpha) grid order; the paper's grids are used as published, without
      refinement.
    """
    from tqdm.auto import tqdm

    from subboost.boosting import subspace_boost_sweep
    from subboost.task_vectors import apply_task_vector

    alphas = check_grid("alpha", alphas, positive=True)
    betas = check_grid("beta", betas, allow_none=True)
    score = score or selection_score("absolute")
    points: list[SweepPoint] = []
    bar = tqdm(total=len(alphas) * len(betas), desc=description, disable=not progress, leave=False)

    boosted_at: dict[float, PyTree] = {}

    def score_candidate(beta: float | None, grid: np.ndarray) -> list[float]:
        # boost(alpha * tau) = alpha * boost(tau): one boost per beta serves every alpha, and every beta of
        # the grid is boosted from one SVD per matrix (on the first boosted candidate).
        if beta is not None and not boosted_at:
            grid_betas = tuple(float(b) for b in betas if b is not None)
            boosted_at.update(zip(grid_betas, subspace_boost_sweep(tau, betas=grid_betas, **dict(boost_kwargs or {}))))
        boosted = tau if beta is None else boosted_at[float(beta)]
        values = []
        for alpha in grid:
            accuracies = dict(evaluate(apply_task_vector(pretrained, boosted, alpha=float(alpha))))
            value = float(score(accuracies))
            if not math.isfinite(value):
                raise SubboostError(f"{description}: the validation score at alpha={alpha}, beta={beta} is {value}.")
            points.append(SweepPoint(float(alpha), None if beta is None else float(beta), accuracies, value))
            values.append(value)
            bar.update()
            bar.set_postfix(best=f"{max(p.score for p in points):.4f}")
        return values

    choice = choose(score_candidate, betas, alphas=np.asarray(alphas, np.float64))
    bar.close()
    return SweepResult(choice.alpha, choice.key if choice.key is None else float(choice.key), choice.score,
                       tuple(points), tuple(map(float, alphas)),
                       tuple(None if b is None else float(b) for b in betas))
