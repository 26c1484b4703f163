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
from subboost.bench.pipeline import cutoff_indices, mean_stable_rank
from subboost.bench.regime import geometry_of_task_vectors


def regime(base: Any, tvs: Any, *, task_counts: Sequence[int], betas: Sequence[float]) -> dict[str, Any]:
    """The figures of the module docstring (``tvs``: task vectors stacked on a leading task axis)."""
    num_tasks = jax.tree_util.tree_leaves(tvs)[0].shape[0]
    geometry = geometry_of_task_vectors(base, tvs)
    norms = geometry["relative_norm"]
    experts_rank = [mean_stable_rank(sb.spectra(jax.tree_util.tree_map(lambda x, t=t: x[t], tvs)))
                    for t in range(num_tasks)]
    sums = {}
    for count in task_counts:
        total = jax.tree_util.tree_map(lambda x, c=count: jnp.sum(jnp.asarray(x[:c]), axis=0), tvs)
        spectra = sb.spectra(total)
        ks = cutoff_indices(spectra, betas)
        sums[str(count)] = {
            "stable_rank": mean_stable_rank(spectra),
            "cutoff_mean": {f"{b:g}": float(k.mean()) for b, k in ks.items()},
            "cutoff_nonzero": {f"{b:g}": float(np.mean(k > 0)) for b, k in ks.items()},
        }
    dims = [np.shape(s)[-1] for s in sb.spectra(jax.tree_util.tree_map(lambda x: x[0], tvs)).values()]
    return {
        "relative_norms": list(norms),
        "relative_norm_mean": float(np.mean(norms)),
        "cosine_mean": geometry["mean_cosine"] if num_tasks > 1 else 0.0,
        "cosine_max": geometry["max_cosine"] if num_tasks > 1 else 0.0,
        "expert_stable_rank": experts_rank,
        "expert_stable_rank_mean": float(np.mean(experts_rank)),
        "max_rank": int(max(dims)),
        "sum": sums,
    }
