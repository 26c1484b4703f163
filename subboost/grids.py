"""The grids of the paper and of the benchmarks: one home for every alpha and beta grid.

A method's own defaults (TIES ``k``, DARE ``p``, Consensus ``min_tasks``, the boosting
``beta``) live in its function's signature; ``DEFAULT_BETA`` reads Subspace Boosting's from
there. What lives here are the grids a sweep walks:

* ``PAPER_BETAS``: the paper's boosting cutoffs, chosen on validation with alpha;
* ``PAPER_LINEAR_ALPHAS`` / ``PAPER_SVD_ALPHAS``: the paper's alpha grids for the linear merges
  (0.1 .. 1.0) and the SVD-based ones (0.1 .. 3.0);
* ``TALL_LAMBDAS``: Consensus's per-task lambda grid;
* ``BENCH_ALPHAS``: the vision benchmark's coarse log grid ``0.01 * 2^k`` (refined by
  ``2^(+-1/2)`` around the best point, `subboost.selection`); ``TEXT_ALPHAS``: the text suite's;
* ``BOOST_SWEEP_BETAS``: the boosting-strength sweep (``beta = 1`` leaves a full-rank spectrum as it is).
"""

from __future__ import annotations

import inspect

from subboost.boosting import subspace_boost

PAPER_BETAS: tuple[float, ...] = (0.0, 0.01, 0.02)
PAPER_LINEAR_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
PAPER_SVD_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 31))
TALL_LAMBDAS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
BENCH_ALPHAS: tuple[float, ...] = tuple(round(0.01 * 2**k, 6) for k in range(10))
TEXT_ALPHAS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
BOOST_SWEEP_BETAS: tuple[float, ...] = PAPER_BETAS + (0.05, 0.1, 0.2, 0.5, 1.0)

# Subspace Boosting's default cutoff, read from `subboost.subspace_boost`'s signature (its one home).
DEFAULT_BETA: float = inspect.signature(subspace_boost).parameters["beta"].default
