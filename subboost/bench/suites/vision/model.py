"""The benchmark's encoder: a small CLIP ViT image tower on ``[0, 1]`` pixels.

Thin glue around `subboost.models.clip_vit.CLIPVisionTransformer`: inputs are
normalised here (``(x - 0.5) / 0.25``), and training inputs get fresh pixel
noise each step (the tasks' only augmentation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost.bench.suites.vision.generators import PIXEL_MEAN, PIXEL_STD
from subboost.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer

Encoder = Callable[[dict, jax.Array], jax.Array]


def make_encoder(config: CLIPVisionConfig) -> Encoder:
    """``encode(params, images)``: ``(..., 16, 16, 3)`` pixels in ``[0, 1]`` -> ``(..., embed_dim)`` features."""
    module = CLIPVisionTransformer(config)

    def encode(params: dict, images: jax.Array) -> jax.Array:
        lead = images.shape[:-3]
        flat = images.reshape((-1,) + images.shape[-3:])
        features = module.apply({"params": params}, (flat - PIXEL_MEAN) / PIXEL_STD)
        return features.reshape(lead + features.shape[-1:])

    return encode


def init_encoder(config: CLIPVisionConfig, key: jax.Array) -> dict:
    """Random encoder parameters."""
    images = jnp.zeros((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
    return CLIPVisionTransformer(config).init(key, images)["params"]


def add_pixel_noise(key: jax.Array, images: jax.Array, sigma: jax.Array) -> jax.Array:
    """``clip(x + sigma * N(0, 1), 0, 1)``; ``sigma`` broadcasts against the leading axes of ``images``."""
    sigma = jnp.asarray(sigma, images.dtype).reshape(jnp.shape(sigma) + (1,) * (images.ndim - jnp.ndim(sigma)))
    return jnp.clip(images + sigma * jax.random.normal(key, images.shape, images.dtype), 0.0, 1.0)
