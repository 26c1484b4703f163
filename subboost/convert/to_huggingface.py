"""subboost's Flax CLIP ViT and BERT parameters -> Hugging Face model directories (``subboost export``).

The inverse of `subboost.convert.hf` and `subboost.convert.bert`:

* ``clip_vision`` -> ``CLIPVisionModelWithProjection`` (``vision_model.*`` and
  ``visual_projection.weight = proj^T``); ``conv1`` ``HWIO`` -> ``OIHW``;
* ``bert`` -> ``BertModel``. subboost's BERT has no pooler (sentence embeddings are
  mean-pooled), so ``pooler.dense`` is written as zeros: ``pooler_output`` is 0 and the last
  hidden states are the model's.

Every Dense kernel ``(in, out)`` becomes a Linear weight ``kernel^T``; the attention kernels
``(embed, heads, head_dim)`` / ``(heads, head_dim, embed)`` are flattened back to
``(embed, embed)`` in torch's contiguous-head order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from subboost.checkpoint_io.safetensors_format import save_safetensors
from subboost.errors import SubboostError
from subboost.models.bert import BertConfig
from subboost.models.clip_vit import LN_EPS, CLIPVisionConfig
from subboost.outputs import EXPORT_FORMAT, write_atomically

PROVENANCE_FILE = "subboost.json"  # marks the directory as subboost's (the --out rules), no architecture


def _linear(prefix: str, dense: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {f"{prefix}.weight": np.ascontiguousarray(np.asarray(dense["kernel"]).T)}
    if "bias" in dense:
        out[f"{prefix}.bias"] = np.asarray(dense["bias"])
    return out


def _norm(prefix: str, norm: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {f"{prefix}.weight": np.asarray(norm["scale"]), f"{prefix}.bias": np.asarray(norm["bias"])}


def _attention(prefix: str, attention: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """query / key / value ``(E, H, hd)`` and out ``(H, hd, E)`` kernels -> torch Linear layers."""
    out = {}
    for flax_name in ("query", "key", "value"):
        kernel = np.asarray(attention[flax_name]["kernel"])
        embed = kernel.shape[0]
        out[f"{prefix}.{names[flax_name]}.weight"] = np.ascontiguousarray(kernel.reshape(embed, -1).T)
        out[f"{prefix}.{names[flax_name]}.bias"] = np.asarray(attention[flax_name]["bias"]).reshape(-1)
    kernel = np.asarray(attention["out"]["kernel"])
    out[f"{prefix}.{names['out']}.weight"] = np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)
    out[f"{prefix}.{names['out']}.bias"] = np.asarray(attention["out"]["bias"])
    return out


def clip_vision_to_huggingface(params: Mapping[str, Any], config: CLIPVisionConfig
                               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, config.json)`` of a ``CLIPVisionModelWithProjection`` equal to the Flax tower."""
    if config.act != "quick_gelu":
        raise SubboostError(f"export: CLIP activation {config.act!r}; Hugging Face CLIP here takes quick_gelu.")
    v = "vision_model."
    tensors = {
        v + "embeddings.patch_embedding.weight": np.ascontiguousarray(np.asarray(params["conv1"]["kernel"]).transpose(3, 2, 0, 1)),
        v + "embeddings.class_embedding": np.asarray(params["class_embedding"]),
        v + "embeddings.position_embedding.weight": np.asarray(params["positional_embedding"]),
        **_norm(v + "pre_layrnorm", params["ln_pre"]),
        **_norm(v + "post_layernorm", params["ln_post"]),
        "visual_projection.weight": np.ascontiguousarray(np.asarray(params["proj"]).T),
    }
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    for i in range(config.layers):
        block, b = params["transformer"][f"resblocks_{i}"], f"{v}encoder.layers.{i}."
        tensors.update(_norm(b + "layer_norm1", block["ln_1"]))
        tensors.update(_attention(b + "self_attn", block["attn"], names))
        tensors.update(_norm(b + "layer_norm2", block["ln_2"]))
        tensors.update(_linear(b + "mlp.fc1", block["mlp"]["c_fc"]))
        tensors.update(_linear(b + "mlp.fc2", block["mlp"]["c_proj"]))
    hf_config = {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "hidden_size": config.width, "intermediate_size": config.hidden_dim, "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads, "image_size": config.image_size, "patch_size": config.patch_size,
        "num_channels": config.in_channels, "projection_dim": config.embed_dim, "hidden_act": "quick_gelu",
        "layer_norm_eps": LN_EPS,
    }
    return tensors, hf_config


def bert_to_huggingface(params: Mapping[str, Any], config: BertConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, config.json)`` of a ``BertModel`` whose last hidden states equal the Flax encoder's."""
    emb = params["embeddings"]
    tensors = {
        "embeddings.word_embeddings.weight": np.asarray(emb["word_embeddings"]["embedding"]),
        "embeddings.position_embeddings.weight": np.asarray(emb["position_embeddings"]["embedding"]),
        "embeddings.token_type_embeddings.weight": np.asarray(emb["token_type_embeddings"]["embedding"]),
        **_norm("embeddings.LayerNorm", emb["layer_norm"]),
    }
    names = {"query": "self.query", "key": "self.key", "value": "self.value", "out": "output.dense"}
    for i in range(config.layers):
        layer, b = params["encoder"][f"layer_{i}"], f"encoder.layer.{i}."
        tensors.update(_attention(b + "attention", layer["attention"], names))
        tensors.update(_norm(b + "attention.output.LayerNorm", layer["attention_norm"]))
        tensors.update(_linear(b + "intermediate.dense", layer["mlp"]["intermediate"]))
        tensors.update(_linear(b + "output.dense", layer["mlp"]["output"]))
        tensors.update(_norm(b + "output.LayerNorm", layer["output_norm"]))
    dtype = tensors["embeddings.word_embeddings.weight"].dtype
    tensors["pooler.dense.weight"] = np.zeros((config.width, config.width), dtype)
    tensors["pooler.dense.bias"] = np.zeros((config.width,), dtype)
    hf_config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": config.vocab_size,
        "hidden_size": config.width, "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_dim, "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps, "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }
    return tensors, hf_config


def to_huggingface(params: Mapping[str, Any], config: CLIPVisionConfig | BertConfig
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, config.json)`` of a subboost Flax model (CLIP vision tower or BERT)."""
    if isinstance(config, CLIPVisionConfig):
        return clip_vision_to_huggingface(params, config)
    if isinstance(config, BertConfig):
        return bert_to_huggingface(params, config)
    raise SubboostError(f"export: no Hugging Face layout for a {type(config).__name__}.")


def export_huggingface(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes a subboost CLIP ViT or BERT checkpoint as a Hugging Face model directory.

    Args:
      checkpoint: a checkpoint with ``subboost.json`` (a converter's output, or a merge of one).
      out: the directory to write (``config.json``, ``model.safetensors``, ``subboost.json``);
        built atomically, under the usual ``--out`` rules.
      overwrite: replace an existing ``out`` that subboost wrote.

    Returns:
      ``out``.
    """
    from subboost.models.loading import load_model

    module, params = load_model(checkpoint)
    tensors, hf_config = to_huggingface(params, module.config)

    def build(directory: Path) -> None:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / PROVENANCE_FILE).write_text(json.dumps(
            {"content": "params", "exported_from": str(checkpoint), "format": EXPORT_FORMAT}, indent=2) + "\n")

    return write_atomically(out, build, overwrite=overwrite, inputs=[checkpoint])


__all__ = ["bert_to_huggingface", "clip_vision_to_huggingface", "export_huggingface", "to_huggingface"]
