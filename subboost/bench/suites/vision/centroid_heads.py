"""Frozen zero-shot-like heads: normalised class centroids of pretrained features.

CLIP experts keep the zero-shot head built from text embeddings of the class
names. Without a text tower, the closest analogue is a head built from a
handful of examples: for class ``c`` of task ``t``,

    e_c = normalise( mean_{i <= k} normalise(f(x_{c,i})) )        (k = head_shots)
    logits = logit_scale * normalise(f(x)) @ [e_1 .. e_C]

which is exactly `subboost.models.heads.heads_from_class_embeddings` applied
to the ``(C, k, embed_dim)`` example features (per-example normalisation, mean
over the "templates" axis, re-normalisation). ``logit_scale`` is the pretrained
CLIP temperature. The heads are computed once from the pretrained encoder and
then frozen: fine-tuning and merging change only the encoder.

A full linear probe was tried first and rejected (DESIGN.md): it lets the
pretrained model reach ~97% of the experts, leaving nothing to merge.

All tasks' heads are stacked and padded to `tasks.MAX_CLASSES` columns; padded
classes get a bias of ``PAD_BIAS`` so they never win and carry no probability.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from subboost.bench.suites.vision.splits import SuiteData, few_shot_examples
from subboost.bench.suites.vision.generators import add_noise
from subboost.models.heads import l2_normalize

PAD_BIAS = -1e9


def centroid_heads(features: jax.Array, num_classes: np.ndarray, *, logit_scale: float) -> dict[str, jax.Array]:
    """Stacked heads from example features.

    Args:
      features: ``(T, C_max, k, E)`` encoder features of ``k`` examples per class
        (rows of absent classes are ignored).
      num_classes: ``(T,)`` classes per task.
      logit_scale: multiplier of the cosine similarities.

    Returns:
      ``{"kernel": (T, E, C_max), "bias": (T, C_max)}`` (pad columns: zero kernel, `PAD_BIAS` bias).
    """
    centroids = l2_normalize(jnp.mean(l2_normalize(features), axis=2))  # (T, C_max, E)
    present = jnp.arange(features.shape[1])[None, :] < jnp.asarray(num_classes)[:, None]  # (T, C_max)
    kernel = jnp.where(present[:, :, None], logit_scale * centroids, 0.0).transpose(0, 2, 1)
    bias = jnp.where(present, 0.0, PAD_BIAS).astype(kernel.dtype)
    return {"kernel": kernel, "bias": bias}


def task_logits(features: jax.Array, heads: dict[str, jax.Array]) -> jax.Array:
    """``(T, n, E)`` features of task ``t``'s images -> ``(T, n, C_max)`` logits of head ``t``."""
    return jnp.einsum("tne,tec->tnc", l2_normalize(features), heads["kernel"]) + heads["bias"][:, None, :]


def take_tasks(heads: dict[str, jax.Array], num_tasks: int) -> dict[str, jax.Array]:
    """The heads of the first ``num_tasks`` tasks."""
    return jax.tree_util.tree_map(lambda x: x[:num_tasks], heads)


def build_heads(encode, params: dict, data: SuiteData, *, shots: int, logit_scale: float, seed: int) -> dict[str, jax.Array]:
    """Zero-shot-like heads of every task of ``data`` from ``shots`` noisy training images per class.

    Args:
      encode: ``encode(params, images)`` (see `subboost.bench.suites.vision.model.make_encoder`).
      params: the pretrained encoder.
      data: the task suite (examples come from its training split, noised with
        each task's pixel noise from a stream fixed by ``seed``).
      shots: examples per class.
      logit_scale: the pretrained temperature.
      seed: run seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4EAD]))
    examples = np.stack(
        [add_noise(rng, few_shot_examples(t, data, shots), float(data.noise[t])) for t in range(data.train.num_tasks)]
    ).astype(np.float32)
    features = jax.jit(encode)(params, jnp.asarray(examples))
    return centroid_heads(features, data.num_classes, logit_scale=logit_scale)
