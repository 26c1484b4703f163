"""Where a suite's experts sit relative to CLIP: the task-vector geometry every suite reports.

Merging works on CLIP because its experts change little and in nearly
separate directions. These figures measure the same properties on a suite's
experts, so a reader can compare (a suite adds its own, e.g. the vision
suite's linear probe, `subboost.bench.suites.vision.regime`):

* relative task-vector norm ``||tau_t|| / ||theta_0||`` per expert (all
  parameters flattened);
* cosine similarity between task vectors, mean and max over pairs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def task_vector_geometry(base: dict, experts: dict) -> dict[str, Any]:
    """Relative norms and pairwise cosines of the experts' task vectors (``experts`` stacked on axis 0)."""
    tvs = jax.tree_util.tree_map(lambda e, b: np.asarray(e) - np.asarray(b)[None], experts, base)
    return geometry_of_task_vectors(base, tvs)


def geometry_of_task_vectors(base: dict, tvs: dict) -> dict[str, Any]:
    """``relative_norm`` ``||tau_t|| / ||theta_0||`` (every leaf flattened, float64), ``mean_cosine`` and
    ``max_cosine`` over pairs (NaN for one task) and the ``cosine_matrix`` (``tvs`` stacked on axis 0)."""
    leaves = jax.tree_util.tree_leaves(tvs)
    num_tasks = leaves[0].shape[0]
    taus = np.concatenate([np.asarray(leaf).reshape(num_tasks, -1) for leaf in leaves], axis=1).astype(np.float64)
    theta = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(base)]).astype(np.float64)
    norms = np.linalg.norm(taus, axis=1)
    unit = taus / np.maximum(norms[:, None], 1e-30)
    cosines = unit @ unit.T
    pairs = cosines[np.triu_indices(len(norms), 1)]
    return {
        "relative_norm": (norms / np.linalg.norm(theta)).tolist(),
        "mean_cosine": float(pairs.mean()) if pairs.size else float("nan"),
        "max_cosine": float(pairs.max()) if pairs.size else float("nan"),
        "cosine_matrix": cosines.tolist(),
    }
