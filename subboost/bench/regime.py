"""Where the benchmark sits relative to CLIP: the regime figures printed with every run.

Merging works on CLIP because its experts change little and in nearly
separate directions, and because its pretrained features already carry each
task (only the zero-shot heads are weak). These figures measure the same
properties here, so a reader can compare:

* linear probe: multinomial logistic regression on the pretrained encoder's
  normalised features of noisy training images, scored on the test split, per
  task; ``probe / expert`` near 1 means the features carry the task;
* relative task-vector norm ``||tau_t|| / ||theta_0||`` per expert (all
  parameters flattened);
* cosine similarity between task vectors, mean and max over pairs;
* stable rank of the merged task vectors against the number of experts (in
  the results' stable-rank table).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.bench import evaluate as bench_eval
from subboost.bench.splits import SuiteData
from subboost.bench.generators import add_noise
from subboost.models.clip_vit import CLIPVisionConfig
from subboost.models.heads import l2_normalize

PROBE_C = 10.0  # inverse L2 strength of the probe (features are unit vectors)
PROBE_MAX_ITER = 1000


def linear_probe_accuracy(
    base: dict, data: SuiteData, *, model: CLIPVisionConfig, batch: int, seed: int, max_train: int = 1024
) -> np.ndarray:
    """``(T,)`` test accuracy of a logistic-regression probe on the frozen pretrained features.

    The probe trains on the first ``max_train`` training images of each task,
    noised once with the task's pixel noise (stream fixed by ``seed``).
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark's linear probe needs scikit-learn: pip install 'subboost[bench]'") from err
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9B0BE]))
    encode = jax.jit(lambda x: l2_normalize(bench_eval.features(base, x, model=model, batch=batch)))
    accuracies = []
    for t in range(data.train.num_tasks):
        train = add_noise(rng, data.train.images[t, :max_train], float(data.noise[t])).astype(np.float32)
        probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
        probe.fit(np.asarray(encode(jnp.asarray(train))), data.train.labels[t, :max_train])
        accuracies.append(probe.score(np.asarray(encode(jnp.asarray(data.test.images[t]))), data.test.labels[t]))
    return np.asarray(accuracies)


def _flat_task_vectors(base: dict, experts: dict) -> tuple[np.ndarray, np.ndarray]:
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda e, b: np.asarray(e) - np.asarray(b)[None], experts, base))
    num_tasks = leaves[0].shape[0]
    taus = np.concatenate([leaf.reshape(num_tasks, -1) for leaf in leaves], axis=1).astype(np.float64)
    theta = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(base)]).astype(np.float64)
    return taus, theta


def task_vector_geometry(base: dict, experts: dict) -> dict[str, Any]:
    """Relative norms and pairwise cosines of the experts' task vectors (``experts`` stacked on axis 0)."""
    taus, theta = _flat_task_vectors(base, experts)
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
