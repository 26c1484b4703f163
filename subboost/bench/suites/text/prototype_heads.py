"""Frozen zero-shot-like heads: cosine prototypes of pretrained sentence embeddings.

For class ``c`` of task ``t``, with ``k = head_shots`` sentences ``x_{c,i}`` of the class:

    p_c = normalise( mean_i normalise(f_0(x_{c,i})) )            (f_0: pretrained, mean-pooled)
    logits = logit_scale * normalise(f(x)) @ [p_1 .. p_C]

(the vision suite's centroid heads, on sentence embeddings). The heads are built once
from the pretrained encoder and frozen; fine-tuning and merging change only the encoder.
Heads are stacked over tasks and padded to the largest class count; padded classes get a
bias of ``PAD_BIAS`` so they never win.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from subboost.models.heads import l2_normalize

PAD_BIAS = -1e9


def prototype_heads(features: jax.Array, num_classes: np.ndarray, *, logit_scale: float) -> dict[str, jax.Array]:
    """``(T, C_max, k, E)`` example embeddings -> ``{"kernel": (T, E, C_max), "bias": (T, C_max)}``."""
    prototypes = l2_normalize(jnp.mean(l2_normalize(features), axis=2))
    present = jnp.arange(features.shape[1])[None, :] < jnp.asarray(num_classes)[:, None]
    kernel = jnp.where(present[:, :, None], logit_scale * prototypes, 0.0).transpose(0, 2, 1)
    bias = jnp.where(present, 0.0, PAD_BIAS).astype(kernel.dtype)
    return {"kernel": kernel, "bias": bias}


def task_logits(features: jax.Array, heads: dict[str, jax.Array]) -> jax.Array:
    """``(T, n, E)`` embeddings of task ``t``'s sentences -> ``(T, n, C_max)`` logits of head ``t``."""
    return jnp.einsum("tne,tec->tnc", l2_normalize(features), heads["kernel"]) + heads["bias"][:, None, :]


def build_heads(embed, params: dict, suite, *, shots: int, logit_scale: float) -> dict[str, jax.Array]:
    """Prototype heads of every task from the suite's ``heads`` split (``shots`` sentences per class)."""
    split = suite.heads
    num_tasks, rows, length = split.input_ids.shape
    features = jax.jit(embed)(params, jnp.asarray(split.input_ids), jnp.asarray(split.attention_mask))
    features = features.reshape(num_tasks, rows // shots, shots, -1)
    return prototype_heads(features, suite.num_classes, logit_scale=logit_scale)


def take_tasks(heads: dict[str, jax.Array], num_tasks: int) -> dict[str, jax.Array]:
    return jax.tree_util.tree_map(lambda x: x[:num_tasks], heads)
