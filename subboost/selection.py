"""Choosing the merging coefficient alpha (and the boosting cutoff beta) on validation.

One rule, shared by the paper suites (`subboost.eval.select_alpha_beta`) and
the mini-benchmarks (`subboost.bench.sweep.select`, the text suite)::

    candidates: an ordered mapping {key: tau_key}     # key = beta (None: no boost)
    grid:       alphas, in the order given (ascending in every caller)

    1. score(key, alpha) for every key and every alpha of the grid
       (score = mean validation accuracy, or normalized accuracy, over tasks);
    2. choose the best (key, alpha); ties go to the first in grid order
       (keys outer, alphas inner): with ascending grids that is the
       smallest beta listed first and the smallest alpha, i.e. the most
       conservative of equally good settings;
    3. optional refinement: the chosen key at ``alpha * f`` for each
       ``f`` of ``refine_factors`` (the mini-benchmark's coarse log grid
       (`subboost.grids.BENCH_ALPHAS`) uses ``2^(-1/2), 2^(1/2)``: the geometric midpoints to
       both neighbours); a refined alpha replaces the grid's only when its
       score is strictly higher (ties keep the grid value), the first of
       equal refined scores wins.

``alpha_on_edge`` flags a coarse choice at either end of a grid of more than
one value: the optimum may lie outside the grid. No refinement is done for a
single-value grid (a fixed alpha). The paper suites use the paper's linear
grids without refinement, as published.

Boosting commutes with positive scaling (``boost(alpha tau) = alpha boost(tau)``),
so callers boost once per beta and reuse it for the whole alpha grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["Choice", "check_grid", "choose"]

# score(key, alphas (A,)) -> (A,) validation scores of the candidate ``key`` at each alpha.
ScoreFn = Callable[[Any, np.ndarray], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen setting.

    Attributes:
      key: the chosen candidate's key (a beta, or None for no boosting).
      alpha: the chosen scaling (a grid value, or a refined one).
      score: the validation score at the choice.
      alpha_on_edge: the coarse choice sat at an end of a grid of more than one value.
      evaluations: how many (key, alpha) settings were scored.
    """

    key: Any
    alpha: float
    score: float
    alpha_on_edge: bool
    evaluations: int


def check_grid(name: str, values: Sequence[Any], *, allow_none: bool = False, positive: bool = False) -> tuple:
    """The grid as a tuple; raises ValueError for an empty grid, repeats, or bad values."""
    values = tuple(values)
    if not values:
        raise ValueError(f"the {name} grid is empty.")
    for v in values:
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v) \
                or (positive and v <= 0):
            need = f"{name}s must be positive" if positive else f"{name}s must be finite numbers or None"
            raise ValueError(f"bad {name} grid value {v!r}: {need}.")
    if len(set(values)) != len(values):
        raise ValueError(f"the {name} grid {list(values)} repeats values.")
    return values


def choose(
    score: ScoreFn,
    keys: Sequence[Hashable],
    *,
    alphas: np.ndarray | Sequence[float],
    refine_factors: Sequence[float] = (),
) -> Choice:
    """The best (key, alpha) by the rule of the module docstring.

    Args:
      score: ``(key, alphas) -> scores``, one finite score per alpha.
      keys: candidate keys in preference order (earlier wins ties).
      alphas: the coarse grid; its dtype is kept for the refined values.
      refine_factors: multiplicative refinement around the chosen alpha
        (``()``: none).
    """
    keys = list(keys)
    if not keys:
        raise ValueError("choose needs at least one candidate.")
    grid = np.asarray(alphas)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("choose needs a non-empty one-dimensional alpha grid.")
    best = None  # (score, key, index)
    for key in keys:
        values = np.asarray(score(key, grid), np.float64)
        index = int(np.argmax(values))  # argmax keeps the first of equal scores
        if best is None or values[index] > best[0]:
            best = (float(values[index]), key, index)
    value, key, index = best
    alpha = float(grid[index])
    evaluations = len(keys) * grid.size
    if grid.size == 1:
        return Choice(key, alpha, value, False, evaluations)
    on_edge = index in (0, grid.size - 1)
    if refine_factors:
        refined = np.asarray([alpha * f for f in refine_factors], grid.dtype)
        values = np.asarray(score(key, refined), np.float64)
        evaluations += refined.size
        if values.max() > value:
            alpha, value = float(refined[int(np.argmax(values))]), float(values.max())
    return Choice(key, alpha, value, on_edge, evaluations)
