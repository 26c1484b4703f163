"""BERT encoder (Hugging Face ``BertModel`` without the pooler) in flax.linen.

Forward pass, for token ids ``input_ids`` ``(B, L)`` and a 0/1 ``attention_mask`` ``(B, L)``:

  x = layer_norm(word[input_ids] + position[0..L-1] + token_type[token_type_ids])
  for each block (post-LayerNorm, as in BERT):
      x = attention_norm(x + attention(x, keys masked where attention_mask == 0))
      x = output_norm(x + output(gelu(intermediate(x))))
  returns x                                                              # (B, L, width)

Sentence embeddings (sentence-transformers' mean pooling) are `mean_pool` of the result:
the average of the hidden states of the tokens with ``attention_mask == 1``.

``gelu`` is the exact erf form (BERT's ``hidden_act="gelu"``); every LayerNorm uses
``layer_norm_eps`` (``1e-12`` in BERT). Padded positions still get hidden states (they
attend to the real tokens, as in ``BertModel``); pooling ignores them.

Parameter tree (attention in the layout of `flax.linen.MultiHeadDotProductAttention`, the
same as the CLIP ViT's, so `subboost.tree`'s matrix predicate and the ``per_qkv`` /
``full`` / ``per_head`` attention modes read it unchanged)::

  embeddings/word_embeddings/embedding          (vocab_size, width)
  embeddings/position_embeddings/embedding      (max_positions, width)
  embeddings/token_type_embeddings/embedding    (type_vocab_size, width)
  embeddings/layer_norm/{scale, bias}
  encoder/layer_{i}/attention/{query, key, value}/kernel   (width, heads, head_dim), bias (heads, head_dim)
  encoder/layer_{i}/attention/out/kernel                   (heads, head_dim, width), bias (width,)
  encoder/layer_{i}/attention_norm/{scale, bias}
  encoder/layer_{i}/mlp/intermediate/{kernel (width, mlp_dim), bias}
  encoder/layer_{i}/mlp/output/{kernel (mlp_dim, width), bias}
  encoder/layer_{i}/output_norm/{scale, bias}

Embedding tables are named ``embedding`` (not ``kernel``), so the default predicate does
not treat them as matrices: merge methods combine them entry-wise.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from subboost.errors import SubboostError
from subboost.models.config import ArchitectureConfig

BERT_ACTIVATIONS: tuple[str, ...] = ("gelu",)


@dataclasses.dataclass(frozen=True)
class BertConfig(ArchitectureConfig):
    """Architecture of a BERT encoder.

    Attributes:
      vocab_size: rows of the word-embedding table.
      width: hidden size (token dimension).
      layers: number of transformer blocks.
      heads: attention heads per block (``width`` must be divisible by it).
      mlp_dim: hidden size of the feed-forward block (BERT's ``intermediate_size``).
      max_positions: rows of the position-embedding table (longest input).
      type_vocab_size: rows of the token-type (segment) embedding table.
      layer_norm_eps: epsilon of every LayerNorm.
      act: feed-forward activation; only ``"gelu"`` (exact erf form).
    """

    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    act: str = "gelu"

    def __post_init__(self):
        self.check_positive_ints(
            ("vocab_size", "width", "layers", "heads", "mlp_dim", "max_positions", "type_vocab_size")
        )
        self.check_heads_divide_width()
        if not self.layer_norm_eps > 0:
            raise SubboostError(f"BertConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}.")
        if self.act not in BERT_ACTIVATIONS:
            raise SubboostError(f"BertConfig.act must be one of {BERT_ACTIVATIONS}, got {self.act!r}.")


# all-MiniLM-L6-v2 (sentence-transformers), the BERT the `text` extra installs.
MINILM_L6 = BertConfig(vocab_size=30522, width=384, layers=6, heads=12, mlp_dim=1536)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        words = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=init, name="word_embeddings")(input_ids)
        positions = nn.Embed(cfg.max_positions, cfg.width, embedding_init=init, name="position_embeddings")(
            jnp.arange(input_ids.shape[-1])
        )
        types = nn.Embed(cfg.type_vocab_size, cfg.width, embedding_init=init, name="token_type_embeddings")(
            token_type_ids
        )
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm")(words + positions + types)


class BertMLP(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = nn.Dense(self.mlp_dim, name="intermediate")(x)
        y = jax.nn.gelu(y, approximate=False)
        return nn.Dense(width, name="output")(y)


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        y = nn.MultiHeadDotProductAttention(num_heads=cfg.heads, name="attention")(x, x, mask=mask)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_norm")(x + y)
        y = BertMLP(cfg.mlp_dim, name="mlp")(x)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_norm")(x + y)


class BertEncoderStack(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, mask)
        return x


class BertEncoder(nn.Module):
    """BERT: ``(B, L)`` token ids and attention mask -> ``(B, L, width)`` last hidden states."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        if input_ids.ndim != 2:
            raise SubboostError(f"BertEncoder expects input_ids of shape (batch, length), "
                                f"got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > cfg.max_positions:
            raise SubboostError(
                f"BertEncoder: input length {input_ids.shape[1]} exceeds max_positions {cfg.max_positions}."
            )
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise SubboostError(
                f"BertEncoder: attention_mask has shape {tuple(attention_mask.shape)}, "
                f"input_ids {tuple(input_ids.shape)}."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        # (B, 1, 1, L): every query attends to the unmasked keys of its own sentence.
        mask = (attention_mask > 0)[:, None, None, :]
        return BertEncoderStack(cfg, name="encoder")(x, mask)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence embeddings: ``sum_l m_l h_l / max(sum_l m_l, 1e-9)`` over the tokens of each row.

    Args:
      hidden: ``(B, L, width)`` hidden states.
      attention_mask: ``(B, L)`` with 1 for real tokens, 0 for padding.

    Returns:
      ``(B, width)``, in the dtype of ``hidden``.
    """
    m = attention_mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def init_params(config: BertConfig, key: jax.Array | None = None, *, length: int = 8) -> dict:
    """Random parameters for ``config`` (BERT's normal(0.02) embeddings, flax defaults elsewhere)."""
    key = jax.random.key(0) if key is None else key
    ids = jnp.zeros((1, length), jnp.int32)
    return BertEncoder(config).init(key, ids, jnp.ones_like(ids))["params"]


def param_shapes(config: BertConfig) -> dict:
    """The parameter tree of ``config`` as `jax.ShapeDtypeStruct` leaves (no computation)."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda k, i: BertEncoder(config).init(k, i, i), jax.random.key(0), ids)["params"]
