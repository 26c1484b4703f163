"""Shared fixtures: small parameter trees shaped like a CLIP ViT."""

from __future__ import annotations

try:  # torchvision must be loaded before TensorFlow in one process (the reverse order segfaults)
    import torchvision  # noqa: F401
except ImportError:
    pass

import os

# The CLI turns on JAX's persistent compilation cache in ~/.cache (issue 17); tests calling
# `subboost.cli.main` in-process must not write there (tests/test_compilation.py tests the cache).
os.environ.setdefault("SUBBOOST_COMPILE_CACHE", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def vit_like_params(rng: np.random.Generator, *, width: int = 8, heads: int = 2, layers: int = 2,
                    mlp: int = 16, dtype=np.float32, scale: float = 1.0) -> dict:
    """A tiny scenic-CLIP-shaped parameter tree with random values."""
    head_dim = width // heads

    def normal(*shape):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    blocks = {}
    for i in range(layers):
        blocks[f"resblocks_{i}"] = {
            "ln_1": {"scale": normal(width), "bias": normal(width)},
            "attn": {
                "query": {"kernel": normal(width, heads, head_dim), "bias": normal(heads, head_dim)},
                "key": {"kernel": normal(width, heads, head_dim), "bias": normal(heads, head_dim)},
                "value": {"kernel": normal(width, heads, head_dim), "bias": normal(heads, head_dim)},
                "out": {"kernel": normal(heads, head_dim, width), "bias": normal(width)},
            },
            "ln_2": {"scale": normal(width), "bias": normal(width)},
            "mlp": {
                "c_fc": {"kernel": normal(width, mlp), "bias": normal(mlp)},
                "c_proj": {"kernel": normal(mlp, width), "bias": normal(width)},
            },
        }
    return {
        "conv1": {"kernel": normal(2, 2, 3, width)},
        "class_embedding": normal(width),
        "positional_embedding": normal(5, width),
        "ln_pre": {"scale": normal(width), "bias": normal(width)},
        "transformer": blocks,
        "ln_post": {"scale": normal(width), "bias": normal(width)},
        "proj": normal(width, 4),
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def experts(rng):
    """(pretrained, [expert_1..expert_4]) with small task vectors."""
    base = vit_like_params(rng)
    finetuned = [
        jax.tree_util.tree_map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), base)
        for _ in range(4)
    ]
    return base, finetuned
