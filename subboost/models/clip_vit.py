"""CLIP vision transformer (the image tower) in flax.linen, with scenic's CLIP parameter names.

Forward pass, for images ``x`` of shape ``(B, H, W, C)`` (NHWC, already normalised):

  tokens = [class_embedding; conv1(x) as (B, N, width)] + positional_embedding   # N = (H/p)(W/p)
  tokens = ln_pre(tokens)
  for each block:  t = t + attn(ln_1(t));  t = t + c_proj(act(c_fc(ln_2(t))))
  features = ln_post(tokens[:, 0]) @ proj                                          # (B, embed_dim)

``act`` is QuickGELU ``x * sigmoid(1.702 x)`` (OpenAI CLIP, and Hugging Face CLIP with
``hidden_act="quick_gelu"``) or the exact erf GELU (open_clip's non-OpenAI models). Every
LayerNorm uses ``eps = 1e-5``. Features are projected but not L2-normalised (the
classification head in `subboost.models.heads` normalises).

Parameter tree (matching scenic's CLIP layout, so scenic checkpoints load)::

  conv1/kernel                       (p, p, C, width)          no bias
  class_embedding                    (width,)
  positional_embedding               (N + 1, width)
  ln_pre/{scale, bias}
  transformer/resblocks_{i}/ln_1/{scale, bias}
  transformer/resblocks_{i}/attn/{query, key, value}/kernel   (width, heads, head_dim), bias (heads, head_dim)
  transformer/resblocks_{i}/attn/out/kernel                   (heads, head_dim, width), bias (width,)
  transformer/resblocks_{i}/ln_2/{scale, bias}
  transformer/resblocks_{i}/mlp/c_fc/{kernel (width, mlp_dim), bias}
  transformer/resblocks_{i}/mlp/c_proj/{kernel (mlp_dim, width), bias}
  ln_post/{scale, bias}
  proj                               (width, embed_dim)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from subboost.errors import SubboostError
from subboost.models.config import ArchitectureConfig

ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu")
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ArchitectureConfig):
    """Architecture of a CLIP image tower.

    Attributes:
      image_size: input height = width in pixels.
      patch_size: side of the square patches (the stride of ``conv1``).
      width: transformer width (token dimension).
      layers: number of residual attention blocks.
      heads: attention heads per block (``width`` must be divisible by it).
      mlp_ratio: MLP hidden size as a multiple of ``width`` (ignored when ``mlp_dim`` is set).
      embed_dim: output dimension of the projection ``proj``.
      in_channels: image channels.
      act: MLP activation, ``"quick_gelu"`` or ``"gelu"`` (exact erf form).
      mlp_dim: explicit MLP hidden size, overriding ``mlp_ratio``.
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    in_channels: int = 3
    act: str = "quick_gelu"
    mlp_dim: int | None = None

    def __post_init__(self):
        self.check_positive_ints(("image_size", "patch_size", "width", "layers", "heads", "embed_dim", "in_channels"))
        if self.image_size % self.patch_size:
            raise SubboostError(
                f"CLIPVisionConfig: image_size {self.image_size} is not divisible by patch_size {self.patch_size}."
            )
        self.check_heads_divide_width()
        if self.act not in ACTIVATIONS:
            raise SubboostError(f"CLIPVisionConfig.act must be one of {ACTIVATIONS}, got {self.act!r}.")
        if self.mlp_dim is not None and (not isinstance(self.mlp_dim, int) or self.mlp_dim <= 0):
            raise SubboostError(f"CLIPVisionConfig.mlp_dim must be a positive integer or None, got {self.mlp_dim!r}.")

    @property
    def hidden_dim(self) -> int:
        """The MLP hidden size (``mlp_dim`` if set, else ``int(width * mlp_ratio)``)."""
        return self.mlp_dim if self.mlp_dim is not None else int(round(self.width * self.mlp_ratio))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Patches plus the class token."""
        return self.grid_size**2 + 1


_CONFIGS: dict[str, CLIPVisionConfig] = {
    "ViT-B/32": CLIPVisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12, embed_dim=512),
    "ViT-B/16": CLIPVisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=512),
    "ViT-L/14": CLIPVisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768),
    "tiny": CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=16),
}


def available_configs() -> tuple[str, ...]:
    return tuple(_CONFIGS)


def get_config(name: str, **overrides: Any) -> CLIPVisionConfig:
    """Named architecture: ``"ViT-B/32"``, ``"ViT-B/16"``, ``"ViT-L/14"`` or ``"tiny"``.

    open_clip spellings (``"ViT-B-32"``) are accepted too; ``overrides`` replace fields
    (e.g. ``act="gelu"`` for open_clip's LAION-trained towers).
    """
    key = name.replace("-", "/").replace("ViT/", "ViT-") if name.startswith("ViT") else name
    if key not in _CONFIGS:
        raise SubboostError(f"unknown CLIP vision config {name!r}; available: {list(_CONFIGS)}.")
    return dataclasses.replace(_CONFIGS[key], **overrides)


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``, OpenAI CLIP's activation."""
    return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise SubboostError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}.")


class MLP(nn.Module):
    hidden_dim: int
    act: str = "quick_gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.hidden_dim, name="c_fc")(x)
        x = activation(self.act)(x)
        return nn.Dense(width, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    heads: int
    hidden_dim: int
    act: str = "quick_gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=LN_EPS, name="ln_1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(epsilon=LN_EPS, name="ln_2")(x)
        return x + MLP(self.hidden_dim, self.act, name="mlp")(y)


class Transformer(nn.Module):
    layers: int
    heads: int
    hidden_dim: int
    act: str = "quick_gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.heads, self.hidden_dim, self.act, name=f"resblocks_{i}")(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """CLIP image tower: ``(B, H, W, C)`` normalised images -> ``(B, embed_dim)`` features."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise SubboostError(
                f"CLIPVisionTransformer expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(NHWC), got {tuple(images.shape)}."
            )
        x = nn.Conv(
            cfg.width, kernel_size=(cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
            padding="VALID", use_bias=False, name="conv1",
        )(images)
        x = x.reshape(x.shape[0], -1, cfg.width)  # row-major over the patch grid, as torch's flatten(2)
        scale = cfg.width**-0.5
        class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (cfg.width,))
        positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(scale), (cfg.num_tokens, cfg.width)
        )
        cls = jnp.broadcast_to(class_embedding.astype(x.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + positional_embedding.astype(x.dtype)
        x = nn.LayerNorm(epsilon=LN_EPS, name="ln_pre")(x)
        x = Transformer(cfg.layers, cfg.heads, cfg.hidden_dim, cfg.act, name="transformer")(x)
        pooled = nn.LayerNorm(epsilon=LN_EPS, name="ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (cfg.width, cfg.embed_dim))
        return pooled @ proj.astype(pooled.dtype)


def init_params(config: CLIPVisionConfig, key: jax.Array | None = None) -> dict:
    """Random parameters for ``config`` (shapes only matter; use a converter for real weights)."""
    key = jax.random.key(0) if key is None else key
    images = jnp.zeros((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
    return CLIPVisionTransformer(config).init(key, images)["params"]


def param_shapes(config: CLIPVisionConfig) -> dict:
    """The parameter tree of ``config`` as `jax.ShapeDtypeStruct` leaves (no computation)."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda k, x: CLIPVisionTransformer(config).init(k, x), jax.random.key(0), images)["params"]
