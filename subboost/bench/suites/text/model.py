"""The suite's sentence encoder: `BertEncoder` + mean pooling, embeddings frozen.

Parameters are split in two: ``params["embeddings"]`` (word, position and token-type
tables and their LayerNorm: frozen, never fine-tuned, so their task vectors are zero) and
``params["encoder"]`` (the transformer blocks: what experts fine-tune and merges combine).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from subboost.models.bert import BertConfig, BertEncoder, mean_pool

Embedder = Callable[[dict, jax.Array, jax.Array], jax.Array]


def make_embedder(config: BertConfig) -> Embedder:
    """``embed(params, input_ids, attention_mask)``: ``(..., L)`` -> ``(..., width)`` mean-pooled embeddings."""
    module = BertEncoder(config)

    def embed(params: dict, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        lead = input_ids.shape[:-1]
        ids = input_ids.reshape((-1, input_ids.shape[-1]))
        mask = attention_mask.reshape(ids.shape)
        pooled = mean_pool(module.apply({"params": params}, ids, mask), mask)
        return pooled.reshape(lead + pooled.shape[-1:])

    return embed


def with_encoder(base: dict, encoder: dict) -> dict:
    """``base`` with its transformer blocks replaced (embeddings shared)."""
    return {**base, "encoder": encoder}
