"""Per-task classification heads: L2-normalised image features -> logits.

``logits = (f / ||f||_2) @ kernel + bias`` with ``kernel`` of shape ``(embed_dim, num_classes)``
(the transpose of a PyTorch ``Linear`` weight) — the head the task-vector codebases attach to a
CLIP image encoder, usually built zero-shot from text embeddings (`heads_from_class_embeddings`).
Parameters: ``{"kernel": (embed_dim, num_classes), "bias": (num_classes,)}``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from subboost.errors import SubboostError

# Floor on ||f||^2: an all-zero feature vector maps to zero logits + bias, not NaN.
_MIN_SQUARED_NORM = 1e-30


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / ||x||_2`` along ``axis``."""
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, _MIN_SQUARED_NORM))


class ClassificationHead(nn.Module):
    """``logits = normalize(features) @ kernel + bias``."""

    num_classes: int
    normalize: bool = True

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (features.shape[-1], self.num_classes))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,))
        if self.normalize:
            features = l2_normalize(features)
        return features @ kernel.astype(features.dtype) + bias.astype(features.dtype)


def heads_from_class_embeddings(class_embeddings, *, logit_scale: float = 100.0) -> dict:
    """Zero-shot head parameters from text embeddings of the class names.

    ``class_embeddings`` is ``(num_classes, embed_dim)`` or ``(num_classes, num_templates, embed_dim)``.
    Each embedding is L2-normalised; with templates they are averaged per class and the mean
    re-normalised (CLIP's prompt ensembling). The kernel is ``logit_scale * E^T`` (CLIP's learned
    temperature ``exp(logit_scale)`` is 100) and the bias is zero.

    Returns:
      ``{"kernel": (embed_dim, num_classes), "bias": (num_classes,)}`` for `ClassificationHead`.
    """
    emb = jnp.asarray(class_embeddings)
    if emb.ndim not in (2, 3):
        raise SubboostError(
            "heads_from_class_embeddings expects (num_classes, embed_dim) or "
            f"(num_classes, num_templates, embed_dim), got shape {tuple(emb.shape)}."
        )
    if not bool(jnp.all(jnp.isfinite(emb))):
        raise SubboostError("heads_from_class_embeddings: class_embeddings contain NaN or inf.")
    emb = l2_normalize(emb)
    if emb.ndim == 3:
        emb = l2_normalize(emb.mean(axis=1))
    kernel = (logit_scale * emb).T
    return {"kernel": kernel, "bias": jnp.zeros((emb.shape[0],), emb.dtype)}


def head_from_linear(weight, bias=None) -> dict:
    """PyTorch ``Linear`` ``(num_classes, embed_dim)`` weight (+ bias) -> `ClassificationHead` params."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise SubboostError(f"head weight must be 2-D (num_classes, embed_dim), got shape {weight.shape}.")
    if bias is None:
        bias = np.zeros((weight.shape[0],), weight.dtype)
    bias = np.asarray(bias)
    if bias.shape != (weight.shape[0],):
        raise SubboostError(f"head bias has shape {bias.shape}, expected ({weight.shape[0]},) "
                            f"to match weight {weight.shape}.")
    return {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}
