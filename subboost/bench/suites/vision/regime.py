"""The vision suite's own regime figure: a linear probe of the pretrained features.

Merging works on CLIP because its pretrained features already carry each task (only the
zero-shot heads are weak). The probe measures that here: multinomial logistic regression on
the pretrained encoder's normalised features of noisy training images, scored on the test
split, per task; ``probe / expert`` near 1 means the features carry the task. The task-vector
norms and cosines every suite reports are `subboost.bench.regime.task_vector_geometry`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from subboost.bench.suites.vision import evaluate as bench_eval
from subboost.bench.suites.vision.generators import add_noise
from subboost.bench.suites.vision.splits import SuiteData
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
