"""The paper's hyper-parameter grids for the validation search (REFERENCE.md).

Alpha (the task-vector scaling) is searched on ``0.1, 0.2, ..., 1.0`` for
linear merges and on ``0.1, ..., 3.0`` for the SVD-based merges (TSV-M, Iso-C,
Iso-CTS), whose merged task vectors are smaller in norm; Subspace Boosting's
beta on the paper's grid (`subboost.grids.PAPER_BETAS`); the TALL-mask threshold of Consensus merging on
``(0.2, ..., 0.6)``, per task.
"""

from __future__ import annotations

from subboost import grids

__all__ = ["BETAS", "LINEAR_ALPHAS", "SVD_ALPHAS", "SVD_METHODS", "TALL_LAMBDAS", "alpha_grid"]

# The paper's grids live in `subboost.grids` (their one home); the names the evaluation has always used.
LINEAR_ALPHAS: tuple[float, ...] = grids.PAPER_LINEAR_ALPHAS
SVD_ALPHAS: tuple[float, ...] = grids.PAPER_SVD_ALPHAS
BETAS: tuple[float, ...] = grids.PAPER_BETAS
TALL_LAMBDAS: tuple[float, ...] = grids.TALL_LAMBDAS
SVD_METHODS: frozenset[str] = frozenset({"tsv", "iso_c", "iso_cts"})


def alpha_grid(method: str) -> tuple[float, ...]:
    """The paper's alpha grid: 0.1..3.0 for SVD methods (TSV-M, Iso-C, Iso-CTS), 0.1..1.0 otherwise.

    Weight averaging already divides by T: it has no alpha (``(1.0,)``).
    """
    if method == "weight_averaging":
        return (1.0,)
    return SVD_ALPHAS if method in SVD_METHODS else LINEAR_ALPHAS
