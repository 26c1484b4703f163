"""Hugging Face CLIP vision towers -> `CLIPVisionTransformer` parameters.

A directory with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` read with the restricted
unpickler), saved by ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or a full
``CLIPModel`` (its text tower is recognised and not converted).

Names: ``vision_model.embeddings.{patch_embedding, class_embedding, position_embedding}``,
``pre_layrnorm``, ``encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.fc1, mlp.fc2}``, ``post_layernorm``; ``visual_projection.weight (embed, width)`` is a
bias-free Linear, so ``proj = W^T``. ``CLIPVisionModel`` has no projection: its features are
the pooled ``post_layernorm`` output, reproduced with ``proj = I`` (``embed_dim = width``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from subboost.convert.common import (
    ConversionError,
    TensorSource,
    count_blocks,
    file_record,
    resolve_config,
    separate_attention,
    vision_blocks,
    vision_tower,
)
from subboost.errors import SubboostError
from subboost.models.clip_vit import LN_EPS, CLIPVisionConfig

ANCHOR = "embeddings.patch_embedding.weight"
ATTENTION_NAMES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
TEXT_KEYS = ("text_projection.weight", "logit_scale", "logit_bias")
TEXT_PREFIXES = ("text_model.",)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(
        (path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    )


def is_hf_state(names: list[str]) -> bool:
    return any(n == ANCHOR or n.endswith("." + ANCHOR) for n in names)


def read_config(path: Path) -> dict[str, Any]:
    from subboost.files import read_json

    try:  # a regular file of bounded size and depth (a FIFO would block)
        return read_json(path / "config.json", what="model config")
    except SubboostError as err:
        raise ConversionError(f"{path / 'config.json'}: unreadable ({err}).") from err


def vision_hints(hf_config: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hints, expected)`` from config.json: heads / act, and the shape fields to cross-check."""
    vision = hf_config.get("vision_config", hf_config)
    act = vision.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise ConversionError(f"{source}: hidden_act {act!r} is not supported (only {sorted(HF_ACTIVATIONS)}).")
    eps = vision.get("layer_norm_eps", LN_EPS)
    if abs(eps - LN_EPS) > 1e-12:
        raise ConversionError(f"{source}: layer_norm_eps {eps} differs from CLIP's {LN_EPS}; not supported.")
    hints = {"heads": vision.get("num_attention_heads", 12), "act": HF_ACTIVATIONS[act]}
    expected = {k: vision[h] for k, h in (("width", "hidden_size"), ("layers", "num_hidden_layers"),
                                          ("patch_size", "patch_size"), ("image_size", "image_size"),
                                          ("in_channels", "num_channels"), ("mlp_dim", "intermediate_size"))
                if h in vision}
    return hints, expected


def load_dir(path: Path) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """``({name: array}, file records)`` of the weights in an HF model directory."""
    from subboost.checkpoint_io.readers import SafetensorsReader

    files: list[Path]
    if (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").exists():
        index_file = path / "model.safetensors.index.json"
        from subboost.files import read_json

        try:
            weight_map = read_json(index_file, what="shard index")["weight_map"]
        except (SubboostError, KeyError, TypeError) as err:
            raise ConversionError(f"{index_file}: unreadable shard index ({err}).") from err
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{index_file} lists shard {f.name}, which does not exist.")
    else:
        from subboost.convert.torch_pickle import load_torch_file, state_dict, to_numpy

        file = path / "pytorch_model.bin"
        tensors, _ = state_dict(load_torch_file(file), source=str(file))
        return {k: to_numpy(v) for k, v in tensors.items()}, [file_record(path / "config.json"), file_record(file)]
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            reader = SafetensorsReader(f)
            for name, value in reader.read(list(reader.specs)).items():
                if name in tensors:
                    raise ConversionError(f"{f}: tensor {name!r} also appears in another shard.")
                tensors[name] = value
        except ConversionError:
            raise
        except Exception as err:  # a damaged file: truncated header, bad JSON, short data
            raise ConversionError(f"{f}: not a readable safetensors file ({type(err).__name__}: {err}).") from err
    return tensors, [file_record(path / "config.json")] + [file_record(f) for f in files]


# Where the Flax tower's parameters sit in a Hugging Face CLIPVisionModel (block entries within a block).
HF_NAMES = {"conv1": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
            "positional_embedding": "embeddings.position_embedding.weight", "ln_pre": "pre_layrnorm",
            "ln_post": "post_layernorm", "resblocks": "encoder.layers.", "ln_1": "layer_norm1",
            "attn": "self_attn", "ln_2": "layer_norm2", "c_fc": "mlp.fc1", "c_proj": "mlp.fc2"}


def convert_state_dict(
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    hf_config: Mapping[str, Any] | None = None,
    config: CLIPVisionConfig | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict, CLIPVisionConfig, dict[str, Any]]:
    """``(params, config, info)`` from an HF-layout state dict of numpy arrays."""
    names = list(tensors)
    anchors = [n for n in names if n == ANCHOR or n.endswith("." + ANCHOR)]
    if len(anchors) != 1:
        raise ConversionError(
            f"{source}: expected one '*{ANCHOR}' key (a Hugging Face CLIP vision tower), found {anchors or 'none'}."
        )
    prefix = anchors[0][: -len(ANCHOR)]  # e.g. "vision_model."
    outer = prefix[: -len("vision_model.")] if prefix.endswith("vision_model.") else prefix
    conv = tensors[anchors[0]].shape
    if len(conv) != 4 or conv[2] != conv[3]:
        raise ConversionError(f"{source}: {anchors[0]!r} has shape {tuple(conv)}, expected (width, channels, p, p).")
    pos = tensors.get(prefix + "embeddings.position_embedding.weight")
    if pos is None:
        raise ConversionError(f"{source}: missing keys ['{prefix}embeddings.position_embedding.weight'].")
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    projection = tensors.get(outer + "visual_projection.weight")
    fc = tensors.get(prefix + "encoder.layers.0.mlp.fc1.weight")
    inferred = {
        "image_size": grid * conv[2], "patch_size": conv[2], "width": conv[0], "in_channels": conv[1],
        "layers": count_blocks(names, prefix + "encoder.layers.", source=source),
        "embed_dim": projection.shape[0] if projection is not None else conv[0],
        "mlp_dim": fc.shape[0] if fc is not None else 4 * conv[0],
    }
    hints: dict[str, Any] = {}
    if hf_config is not None:
        hints, expected = vision_hints(hf_config, source)
        for name, value in expected.items():
            if inferred[name] != value:
                raise ConversionError(f"{source}: config.json says {name}={value} but the weights have {inferred[name]}.")
    cfg, notes = resolve_config(inferred, source=source, config=config, hints=hints, overrides=overrides)
    src = TensorSource(tensors, source=source, prefix=prefix, what="Hugging Face CLIP vision model")
    w = cfg.width
    blocks = vision_blocks(src, cfg, HF_NAMES, attention=functools.partial(separate_attention, names=ATTENTION_NAMES))
    if projection is not None:
        proj = np.ascontiguousarray(src.get("visual_projection.weight", (cfg.embed_dim, w), prefix=outer).T)
    else:
        proj = np.eye(w, dtype=tensors[anchors[0]].dtype)
        notes.append("no visual_projection (CLIPVisionModel): proj is the identity, features = pooled output")
    params = vision_tower(src, cfg, HF_NAMES, blocks=blocks, proj=proj)
    src.ignore(lambda k: k == prefix + "embeddings.position_ids")  # a non-learned index buffer
    ignored = src.ignore(
        lambda k: k.startswith(outer) and (k[len(outer):] in TEXT_KEYS or k[len(outer):].startswith(TEXT_PREFIXES))
    )
    src.finish()
    info = {
        "layout": "full CLIPModel (text tower not converted)" if ignored else
        ("CLIPVisionModelWithProjection" if projection is not None else "CLIPVisionModel"),
        "key_prefix": prefix,
        "ignored_keys": len(ignored),
        "notes": notes,
    }
    return params, cfg, info
