"""The one builder of test parameter trees (shared by the test modules and `conftest.py`).

- `vit_like_params`: a tiny scenic-CLIP-shaped tree (attention kernels of 3-D
  shape, MLP, norms, excluded embeddings and projection).
- `perturbed`: experts ``base + scale * noise`` of a base tree.
- `dense_tree`: Flax Dense kernels ``(in, out)`` from PyTorch-oriented
  ``(out, in)`` matrices, single or stacked over experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dense_tree", "perturbed", "vit_like_params"]


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


def perturbed(base: dict, rng: np.random.Generator, *, num: int, scale: float = 0.1) -> list[dict]:
    """``num`` experts ``base + scale * N(0, 1)``, each leaf in its own dtype."""
    return [jax.tree_util.tree_map(lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), base)
            for _ in range(num)]


def dense_tree(layers: Mapping[str, np.ndarray | Sequence[np.ndarray]], *, bias: bool = False,
               dtype=jnp.float32) -> dict:
    """``{"a/b": A (out, in)}`` or ``{"a/b": [A_1..A_T]}`` -> ``{"a": {"b": {"kernel": A^T}}}``.

    A list is stacked on a leading expert axis: kernels ``(T, in, out)``.
    ``bias`` adds zero biases ``(out,)`` (``(T, out)`` for a list); ``dtype``
    None keeps `jnp.asarray`'s choice.
    """
    tree: dict = {}
    for name, matrices in layers.items():
        node = tree
        for part in name.split("/"):
            node = node.setdefault(part, {})
        stacked = not isinstance(matrices, np.ndarray)
        kernel = np.stack([a.T for a in matrices]) if stacked else np.asarray(matrices).T
        node["kernel"] = jnp.asarray(kernel, dtype)
        if bias:
            node["bias"] = jnp.zeros(kernel.shape[:-2] + kernel.shape[-1:], dtype or jnp.float32)
    return tree
