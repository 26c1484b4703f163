"""Where a set of experts sits: the quantities that decide how merging behaves.

For stacked task vectors ``tau_t = theta_t - theta_0`` (the transformer blocks):

* relative norm ``||tau_t|| / ||theta_0||`` (Frobenius over all fine-tuned parameters);
* pairwise cosine ``<tau_s, tau_t> / (||tau_s|| ||tau_t||)`` (mean and max over pairs);
* mean stable rank ``||M||_F^2 / ||M||_2^2`` of each expert's matrices, and of the task-
  arithmetic sum ``sum_{t<=T} tau_t`` at each merged task count ``T`` (rank collapse:
  the sum's stable rank stays far below ``min(m, n)``);
* Subspace Boosting's cutoff index ``k`` on that sum for every beta (cumsum mode, as
  `subboost.subspace_boost`): ``k = 0`` raises every singular value to the largest one;
  reported as the mean over matrices and the share of matrices with ``k > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import subboost as sb
from subboost.boosting import boost_singular_values, cutoff_index


def _flat(tree, t: int | None = None) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(np.asarray(x if t is None else x[t], np.float64)) for x in leaves])


def stable_rank_of(spectra: dict[str, Any]) -> float:
    """Mean stable rank ``sum s^2 / s_0^2`` over every matrix, from ``sb.spectra`` output."""
    values = []
    for s in spectra.values():
        s = np.asarray(s, np.float64)
        values.append(np.ravel(np.sum(s**2, axis=-1) / np.maximum(s[..., 0] ** 2, np.finfo(np.float64).tiny)))
    return float(np.mean(np.concatenate(values)))


def mean_stable_rank(tau: Any) -> float:
    return stable_rank_of(sb.spectra(tau))


def boosted_stable_rank(spectra: dict[str, Any], beta: float) -> float:
    """Stable rank after boosting at ``beta``: boosting keeps the singular vectors, so the spectra are
    ``max(s_i, s_k)`` (`subboost.boosting.boost_singular_values`) and no new SVD is needed."""
    return stable_rank_of({k: boost_singular_values(jnp.asarray(s), beta=beta) for k, s in spectra.items()})


def cutoffs_from_spectra(spectra: dict[str, Any], betas: Sequence[float]) -> dict[float, np.ndarray]:
    """Per beta, the cutoff index of every matrix (cumsum mode, as `subboost.subspace_boost`)."""
    return {b: np.concatenate([np.ravel(np.asarray(cutoff_index(jnp.asarray(s), beta=b))) for s in spectra.values()])
            for b in betas}


def cutoffs(tau: Any, betas: Sequence[float]) -> dict[float, np.ndarray]:
    """Per beta, the cutoff index of every matrix of ``tau``."""
    return cutoffs_from_spectra(sb.spectra(tau), betas)


def regime(base: Any, tvs: Any, *, task_counts: Sequence[int], betas: Sequence[float]) -> dict[str, Any]:
    """The figures of the module docstring (``tvs``: task vectors stacked on a leading task axis)."""
    num_tasks = jax.tree_util.tree_leaves(tvs)[0].shape[0]
    flat = np.stack([_flat(tvs, t) for t in range(num_tasks)])
    norms = np.linalg.norm(flat, axis=1)
    base_norm = float(np.linalg.norm(_flat(base)))
    cos = flat @ flat.T / np.outer(norms, norms)
    pairs = cos[np.triu_indices(num_tasks, 1)] if num_tasks > 1 else np.zeros(1)
    experts_rank = [mean_stable_rank(jax.tree_util.tree_map(lambda x, t=t: x[t], tvs)) for t in range(num_tasks)]
    sums = {}
    for count in task_counts:
        total = jax.tree_util.tree_map(lambda x, c=count: jnp.sum(jnp.asarray(x[:c]), axis=0), tvs)
        ks = cutoffs(total, betas)
        sums[str(count)] = {
            "stable_rank": mean_stable_rank(total),
            "cutoff_mean": {f"{b:g}": float(k.mean()) for b, k in ks.items()},
            "cutoff_nonzero": {f"{b:g}": float(np.mean(k > 0)) for b, k in ks.items()},
        }
    dims = [min(np.shape(s)[-1], 10**9) for s in sb.spectra(jax.tree_util.tree_map(lambda x: x[0], tvs)).values()]
    return {
        "relative_norms": (norms / base_norm).tolist(),
        "relative_norm_mean": float(np.mean(norms / base_norm)),
        "cosine_mean": float(pairs.mean()),
        "cosine_max": float(pairs.max()),
        "expert_stable_rank": experts_rank,
        "expert_stable_rank_mean": float(np.mean(experts_rank)),
        "max_rank": int(max(dims)),
        "sum": sums,
    }
