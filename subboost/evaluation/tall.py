"""Per-task TALL-mask thresholds of Consensus merging, tuned on validation (the TALL code's procedure)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subboost.evaluation.grids import TALL_LAMBDAS
from subboost.selection import check_grid
from subboost.tree import PyTree

__all__ = ["tune_tall_lambdas"]


def tune_tall_lambdas(
    pretrained: PyTree,
    tvs: PyTree,
    evaluate_task: Callable[[PyTree, int], float],
    *,
    alpha: float,
    lambdas: Sequence[float] = TALL_LAMBDAS,
    progress: bool = True,
    merged: PyTree | None = None,
) -> tuple[float, ...]:
    """Per-task TALL-mask thresholds for Consensus merging, chosen on validation.

    For each task t and each ``lam``: ``m_t = |tau_t| > lam |tau_MTL - tau_t|``
    (``tau_MTL = sum_t tau_t``, or ``merged`` when given, e.g. the TIES vector);
    the task's model ``theta_0 + alpha (m_t * tau_MTL)`` is scored on task t's
    validation split by ``evaluate_task(params, t)``; the best ``lam`` (first on
    ties) is task t's threshold. The TALL code scores at ``alpha = 1.0``.

    Returns:
      One lambda per task, in the order of the expert axis.
    """
    from tqdm.auto import tqdm

    from subboost.merging.averaging import task_arithmetic
    from subboost.merging.consensus import tall_masks
    from subboost.task_vectors import apply_task_vector, num_experts

    lambdas = tuple(float(v) for v in check_grid("lambda", lambdas))
    num_tasks = num_experts(tvs)
    tau_mtl = task_arithmetic(tvs) if merged is None else merged
    select = jax.jit(lambda masks, total, t: jax.tree_util.tree_map(lambda m, x: jnp.where(m[t], x, 0), masks, total))
    scores = np.zeros((num_tasks, len(lambdas)))
    bar = tqdm(total=num_tasks * len(lambdas), desc="TALL lambdas", disable=not progress, leave=False)
    # lambda traced: one program for the grid
    masks_at = jax.jit(lambda x, total, lam: tall_masks(x, lambdas=lam, merged=total))
    for j, lam in enumerate(lambdas):
        masks = masks_at(tvs, tau_mtl, jnp.float32(lam))
        for t in range(num_tasks):
            scores[t, j] = evaluate_task(apply_task_vector(pretrained, select(masks, tau_mtl, t), alpha=alpha), t)
            bar.update()
    bar.close()
    return tuple(lambdas[int(np.argmax(scores[t]))] for t in range(num_tasks))
