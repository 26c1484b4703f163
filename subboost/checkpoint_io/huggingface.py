"""Hugging Face model directories of any architecture: read lazily, merged by name, written back.

A Hugging Face directory is ``config.json`` plus weights in one of four layouts:
``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin``
(read with subboost's restricted unpickler, `subboost.convert.torch_pickle`) or a sharded
``pytorch_model.bin.index.json``. A sentence-transformers folder (``modules.json``) holds
one in its root or in its ``Transformer`` module's sub-folder.

`HuggingFaceReader` reads one as a flat tree ``{tensor name: array}`` keyed by the
checkpoint's own names (``"encoder.layer.0.attention.self.query.weight"``), without any Flax
class for the architecture; safetensors tensors are read one at a time by positioned reads.
Which tensors are matrices, and which are attention q/k/v, comes from names
(`huggingface_is_matrix`), so ``attention="per_qkv" | "full" | "per_head"`` keep their meaning:

* a 2-D ``*.weight`` is a matrix in PyTorch layout ``(out, in)`` (`subboost.tree.MatrixLayout`
  ``"matrix"``), except embeddings (any module named ``*embed*``, ``wte``, ``wpe``,
  ``relative_attention_bias``, ``shared``) and output heads (``lm_head``, ``classifier``,
  ``score``, ``visual_projection``, ``text_projection``, ...), which are non-matrix leaves;
* q/k/v (``query`` / ``key`` / ``value`` of BERT, RoBERTa, ViT; ``q`` / ``k`` / ``v`` of MPNet;
  ``q_proj`` / ``k_proj`` / ``v_proj`` of CLIP, Llama, Mistral, Qwen2, grouped-query shapes
  included) are ``"qkv_rows"`` leaves with their head counts from ``config.json``; GPT-2's fused
  ``c_attn`` (a ``Conv1D``, stored ``(in, 3 * out)``) is one ``"qkv_rows"`` leaf of three
  projections, read transposed;
* attention outputs (``attention.output.dense``, ``o``, ``o_proj``, ``out_proj``, GPT-2's
  ``attn.c_proj``) are ``"out_cols"`` leaves (heads along the columns);
* GPT-2's other ``Conv1D`` weights (``c_fc``, ``mlp.c_proj``) are ``(in, out)``: ``"dense"``.

Tensors that are not merged -- integer or boolean tensors, buffers that transformers
versions save or not (``position_ids``, GPT-2's ``attn.bias`` / ``attn.masked_bias``,
``rotary_emb.inv_freq``) -- are *passed through*: copied from the base into the output, never
compared with the experts. Tied weights stored twice in a ``.bin`` file (one storage) are
merged once and written once (transformers re-ties them on load).

`HuggingFaceWriter` writes a merged model as a Hugging Face directory: safetensors shards of
at most ``shard_bytes`` (one ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` and
an index), the experts' dtypes and tensor names in the base's order, every other file of the
base (config, tokenizer, generation config, a sentence-transformers folder's modules) copied,
and subboost's provenance in ``merge_info.json``. It writes inside the staging directory of
`subboost.outputs.staged_output`, so the output appears atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from subboost.checkpoint_io.metadata import DIRECTORY_FORMATS
from subboost.checkpoint_io.readers import DIRECTORY_OPENERS, CheckpointReader, SafetensorsReader
from subboost.checkpoint_io.safetensors_format import SAFETENSORS_DTYPES, SafetensorsWriter, read_safetensors_header
from subboost.errors import SubboostError
from subboost.tree import MatrixLayout

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_LAYOUTS = (SAFETENSORS_INDEX, SAFETENSORS_FILE, BIN_INDEX, BIN_FILE)
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' own default max_shard_size ("5GB")

# Weights of the base that a merged output must not carry over (they would be stale).
_STALE_WEIGHTS = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?"
    r"|tf_model\.h5|flax_model\.msgpack(\.index\.json)?|model\.ckpt.*|merge_info\.json|COMPLETE|subboost\.json)$"
)
# Buffers that some transformers versions save and others do not: never merged, never compared.
_BUFFER_NAMES = re.compile(r"(^|\.)(position_ids|masked_bias|inv_freq)$|(^|\.)attn\.bias$")
_EMBEDDING_MODULES = re.compile(r"embed|^(wte|wpe|relative_attention_bias|shared)$")
HEAD_MODULES = frozenset({
    "lm_head", "classifier", "score", "visual_projection", "text_projection", "qa_outputs", "pre_classifier",
    "head", "heads", "pre_logits", "cls", "output_projection",
})
_QKV_ROLES = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}
_SHORT_QKV_ROLES = {"q": 0, "k": 1, "v": 2}  # MPNet / T5: only inside an attention module
_OUT_MODULES = frozenset({"o_proj", "out_proj"})
# Architectures whose Linear layers are GPT-2's Conv1D, stored (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


# ----------------------------------------------------------------------------
# Finding the model
# ----------------------------------------------------------------------------
def model_folder(path: str | os.PathLike) -> Path | None:
    """The folder holding ``config.json`` and weights: ``path``, or a sentence-transformers module's; else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / CONFIG_FILE).is_file() and any((path / name).is_file() for name in WEIGHT_LAYOUTS):
        return path
    modules_file = path / SENTENCE_TRANSFORMERS_MODULES
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{modules_file}: unreadable sentence-transformers module list ({err}).") from err
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Transformer"):
            folder = path / str(module.get("path", ""))
            if folder.resolve().is_relative_to(path.resolve()) and (folder / CONFIG_FILE).is_file():
                return folder if any((folder / n).is_file() for n in WEIGHT_LAYOUTS) else None
    return None


def is_huggingface_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model (or sentence-transformers) directory."""
    return model_folder(path) is not None


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict (`SubboostError` naming the file if unreadable)."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{folder / CONFIG_FILE}: unreadable model configuration ({err}).") from err
    if not isinstance(config, dict):
        raise SubboostError(f"{folder / CONFIG_FILE}: not a JSON object.")
    return config


# ----------------------------------------------------------------------------
# Family rules: which tensors are matrices, which are q/k/v
# ----------------------------------------------------------------------------
def _sub_config(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The tower's configuration of a two-tower model (CLIP: ``vision_config`` / ``text_config``)."""
    for prefix, key in (("vision_model.", "vision_config"), ("text_model.", "text_config")):
        if name.startswith(prefix) and isinstance(config.get(key), Mapping):
            return config[key]
    return config


def attention_heads(config: Mapping[str, Any], name: str) -> tuple[int, int]:
    """``(query heads, key/value heads)`` of the tower holding tensor ``name`` (0 where unknown)."""
    sub = _sub_config(config, name)
    heads = next((sub[k] for k in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
                  if isinstance(sub.get(k), int)), 0)
    kv_heads = next((sub[k] for k in ("num_key_value_heads", "num_kv_heads", "n_head_kv")
                     if isinstance(sub.get(k), int)), heads)
    return heads, kv_heads


def attention_block(name: str) -> str | None:
    """The attention block whose q, k or v projection tensor ``name`` belongs to, else None.

    ``"model.layers.0.self_attn.q_proj.weight"`` -> ``"model.layers.0.self_attn"``.
    """
    parts = name.split(".")
    if len(parts) < 3:
        return None
    module, parent = parts[-2], parts[-3]
    if module in _QKV_ROLES or (module in _SHORT_QKV_ROLES and "att" in parent.lower()):
        return ".".join(parts[:-2])
    return None


def matrix_layout(name: str, shape: Sequence[int], config: Mapping[str, Any]) -> MatrixLayout | None:
    """How tensor ``name`` of shape ``shape`` is read as a matrix (None: not a matrix). See the module docstring."""
    parts = name.split(".")
    if len(shape) != 2 or len(parts) < 2 or parts[-1] != "weight":
        return None
    modules = parts[:-1]
    if any(_EMBEDDING_MODULES.search(m) or m in HEAD_MODULES for m in modules):
        return None
    module, parent = modules[-1], (modules[-2] if len(modules) >= 2 else "")
    conv1d = config.get("model_type") in CONV1D_MODEL_TYPES
    heads, kv_heads = attention_heads(config, name)
    block = attention_block(name)
    if block is not None:
        role = _QKV_ROLES.get(module, _SHORT_QKV_ROLES.get(module, 0))
        return MatrixLayout("qkv_rows", heads=heads if role == 0 else kv_heads, qkv_block=block, qkv_role=role)
    if conv1d and module == "c_attn":
        return MatrixLayout("qkv_rows", heads=heads, transposed=True, fused=3)
    if conv1d and module == "c_proj" and parent == "attn":
        return MatrixLayout("out_cols", heads=heads, transposed=True)
    if (module in _OUT_MODULES or (module == "o" and "att" in parent.lower())
            or name.endswith("attention.output.dense.weight")):
        return MatrixLayout("out_cols", heads=heads)
    if conv1d and module in ("c_fc", "c_proj"):
        return MatrixLayout("dense")
    return MatrixLayout("matrix")


def huggingface_is_matrix(config: Mapping[str, Any]) -> Callable[[str, Any], MatrixLayout | None]:
    """The matrix predicate of a Hugging Face tree keyed by tensor names (pass as ``is_matrix=``).

    Args:
      config: the model's ``config.json`` (head counts, ``model_type``).

    Returns:
      ``predicate(path, leaf) -> MatrixLayout | None`` (`matrix_layout`).
    """
    config = dict(config)

    def predicate(path: str, leaf: Any) -> MatrixLayout | None:
        return matrix_layout(path, np.shape(leaf), config)

    predicate.__name__ = f"huggingface_is_matrix_{config.get('model_type', 'unknown')}"
    return predicate


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def _load_index(index_file: Path) -> dict[str, str]:
    """``{tensor: shard file name}`` of an index, with every problem naming the index file."""
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{index_file}: unreadable shard index ({err}).") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SubboostError(f"{index_file}: not a shard index (no 'weight_map' object).")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise SubboostError(f"{index_file}: tensor {name!r} maps to an invalid shard name {shard!r}.")
        if not (index_file.parent / shard).is_file():
            raise SubboostError(f"{index_file}: shard {shard!r} (holding {name!r}) does not exist.")
    return weight_map


def _torch_tensors(file: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: torch tensor}, {tied alias: kept name})`` of a ``.bin`` file, read by the safe unpickler."""
    from subboost.convert.torch_pickle import load_torch_file, state_dict

    tensors, _ = state_dict(load_torch_file(file), source=str(file))
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), str(t.dtype))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return {n: t for n, t in tensors.items() if n not in aliases}, aliases


class HuggingFaceReader(CheckpointReader):
    """A Hugging Face model directory read lazily as ``{tensor name: array}``.

    Attributes:
      source: the directory as named in messages.
      folder: the folder holding ``config.json`` and the weights (a sentence-transformers
        folder's ``Transformer`` module, or ``source`` itself).
      config: ``config.json``.
      specs: the merged tensors, ``{name: jax.ShapeDtypeStruct}`` in tree-flatten (sorted) order.
      passthrough: tensors copied from the base, never merged (``{name: ShapeDtypeStruct}``).
      tied: tied copies stored twice in a ``.bin`` file: ``{alias: kept name}`` (not written).
      order: every stored tensor name (merged and passed through) in the checkpoint's order.
      is_matrix: the family rules' matrix predicate (`huggingface_is_matrix`).
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.source = str(path)
        folder = model_folder(self.root)
        if folder is None:
            raise SubboostError(
                f"{self.root}: not a Hugging Face model directory (needs {CONFIG_FILE} and one of "
                f"{', '.join(WEIGHT_LAYOUTS)}, or a sentence-transformers {SENTENCE_TRANSFORMERS_MODULES})."
            )
        self.folder = folder
        self.config = read_config(folder)
        self.is_matrix = huggingface_is_matrix(self.config)
        self.tied: dict[str, str] = {}
        self._shards: dict[str, SafetensorsReader] = {}
        self._torch: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        stored: dict[str, jax.ShapeDtypeStruct] = {}
        if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS_FILE).is_file():
            self.weights_format = "safetensors"
            for name, shard in self._safetensors_layout(folder).items():
                self._where[name] = shard
                stored[name] = self._shards[shard].specs[name]
        else:
            self.weights_format = "bin"
            index = folder / BIN_INDEX
            shards = sorted(set(_load_index(index).values())) if index.is_file() else [BIN_FILE]
            for shard in shards:
                tensors, aliases = _torch_tensors(folder / shard)
                self.tied.update(aliases)
                for name, t in tensors.items():
                    if name in self._where:
                        raise SubboostError(f"{folder / shard}: tensor {name!r} is also in {self._where[name]}.")
                    self._where[name] = shard
                    self._torch[name] = t
                    stored[name] = jax.ShapeDtypeStruct(tuple(t.shape), _numpy_dtype(t.dtype, folder / shard, name))
        self.order = list(stored)
        self.passthrough = {n: s for n, s in stored.items() if not _is_merged(n, s)}
        merged = sorted(n for n in stored if n not in self.passthrough)
        self.specs = {n: stored[n] for n in merged}

    def _safetensors_layout(self, folder: Path) -> dict[str, str]:
        """``{tensor: shard}`` in storage order, every shard's header checked against the index."""
        index_file = folder / SAFETENSORS_INDEX
        if not index_file.is_file():
            self._shards[SAFETENSORS_FILE] = SafetensorsReader(folder / SAFETENSORS_FILE)
            return {n: SAFETENSORS_FILE for n in _header_order(folder / SAFETENSORS_FILE)}
        weight_map = _load_index(index_file)
        holder: dict[str, str] = {}
        layout: dict[str, str] = {}
        for shard in dict.fromkeys(weight_map.values()):
            self._shards[shard] = SafetensorsReader(folder / shard)  # checks offsets against the file size
            for name in _header_order(folder / shard):
                if name in holder:
                    raise SubboostError(f"{index_file}: tensor {name!r} is stored in two shards, "
                                        f"{holder[name]} and {shard}.")
                holder[name] = shard
                if weight_map.get(name) != shard:
                    raise SubboostError(f"{folder / shard}: holds tensor {name!r}, which {index_file.name} "
                                        f"maps to {weight_map.get(name)!r}.")
                layout[name] = shard
        missing = [n for n in weight_map if n not in holder]
        if missing:
            raise SubboostError(f"{index_file}: tensors {missing[:5]} are not in the shards the index names.")
        return layout

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self._where:
                raise SubboostError(f"{self.source}: no tensor {name!r}.")
            by_shard.setdefault(self._where[name], []).append(name)
        for shard, members in by_shard.items():
            if self.weights_format == "safetensors":
                out.update(self._shards[shard].read(members))
            else:
                from subboost.convert.torch_pickle import to_numpy

                out.update({n: to_numpy(self._torch[n]) for n in members})
        return {n: out[n] for n in names}


def _header_order(file: Path) -> list[str]:
    """Tensor names of a safetensors file in data order (how transformers wrote them)."""
    header, _ = read_safetensors_header(file)
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def _numpy_dtype(torch_dtype: Any, file: Path, name: str) -> np.dtype:
    import torch

    table = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if torch_dtype not in table:
        raise SubboostError(f"{file}: tensor {name!r} has dtype {torch_dtype}, which subboost cannot read.")
    return SAFETENSORS_DTYPES[table[torch_dtype]]


def _is_merged(name: str, spec: jax.ShapeDtypeStruct) -> bool:
    floating = np.dtype(spec.dtype).kind == "f" or np.dtype(spec.dtype) == SAFETENSORS_DTYPES["BF16"]
    return floating and not _BUFFER_NAMES.search(name)


def open_huggingface(path: str | os.PathLike) -> HuggingFaceReader:
    """A lazy reader of the Hugging Face model directory ``path`` (see `HuggingFaceReader`)."""
    return HuggingFaceReader(path)


def read_huggingface(path: str | os.PathLike, *, include_passthrough: bool = False) -> dict[str, np.ndarray]:
    """A whole Hugging Face model directory as ``{tensor name: numpy array}``.

    Args:
      path: the directory (see the module docstring for the layouts read).
      include_passthrough: also return the tensors a merge copies from the base unmerged
        (integer tensors, ``position_ids`` and similar buffers).

    Returns:
      A flat dict keyed by the checkpoint's tensor names: a pytree whose leaves are named
      like the checkpoint. Matrices are selected with ``is_matrix=huggingface_is_matrix(config)``.
    """
    reader = HuggingFaceReader(path)
    names = list(reader.specs) + (list(reader.passthrough) if include_passthrough else [])
    return reader.read(names)


def _open_if_huggingface(path: Path) -> HuggingFaceReader | None:
    return HuggingFaceReader(path) if is_huggingface_dir(path) else None


DIRECTORY_OPENERS.append(_open_if_huggingface)
DIRECTORY_FORMATS.append(lambda path: "huggingface" if is_huggingface_dir(path) else None)


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"50KB"`` / ``"2GiB"`` / ``1000`` -> bytes (transformers' units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise SubboostError(f"shard size {text!r}: expected a byte count such as 5GB, 500MB or 2GiB.")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(match.group(1)) * scale)
    if value < 1:
        raise SubboostError(f"shard size {text!r} must be positive.")
    return value


def plan_shards(specs: Mapping[str, tuple[tuple[int, ...], Any]], shard_bytes: int) -> list[list[str]]:
    """Tensors, in order, cut into shards of at most ``shard_bytes`` (a larger tensor alone in its own)."""
    shards: list[list[str]] = []
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if not shards or (shards[-1] and size + nbytes > shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _copy_tree(src: Path, dst: Path, *, skip_weights_in: Path) -> list[str]:
    """Copies ``src`` into ``dst`` except hidden entries and stale weights of ``skip_weights_in``; returns what was left out."""
    left_out = []
    for entry in sorted(src.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            (dst / entry.name).mkdir(exist_ok=True)
            left_out += _copy_tree(entry, dst / entry.name, skip_weights_in=skip_weights_in)
        elif entry.parent.resolve() == skip_weights_in.resolve() and _STALE_WEIGHTS.match(entry.name):
            left_out.append(str(entry))
        elif entry.is_file():
            shutil.copy2(entry, dst / entry.name, follow_symlinks=True)
    return left_out


class HuggingFaceWriter:
    """Writes a merged model as a Hugging Face directory inside ``directory`` (a staging folder).

    The merged tensors are written as they come (`write`); `close` adds the base's
    passed-through tensors, the shard index and every other file of the base.

    Args:
      directory: the folder to fill (empty; `subboost.outputs.staged_output` renames it).
      base: the base's reader (names, order, files to copy).
      specs: ``{name: (shape, dtype)}`` of the merged tensors.
      shard_bytes: the most bytes in one shard file.
    """

    def __init__(self, directory: str | os.PathLike, base: HuggingFaceReader,
                 specs: Mapping[str, tuple[tuple[int, ...], Any]], *, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.base = base
        self.left_out = _copy_tree(base.root, self.directory, skip_weights_in=base.folder)
        self.model_dir = self.directory / base.folder.relative_to(base.root)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        everything = {**{n: (tuple(s.shape), np.dtype(s.dtype)) for n, s in base.passthrough.items()}, **specs}
        ordered = {n: everything[n] for n in base.order if n in everything}
        shards = plan_shards(ordered, shard_bytes)
        count = len(shards)
        names = [SAFETENSORS_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                       for i in range(count)]
        self.weight_map = {n: file for file, members in zip(names, shards) for n in members}
        self.total_size = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in ordered.values())
        self._writers: dict[str, SafetensorsWriter] = {}
        try:
            for file, members in zip(names, shards):
                self._writers[file] = SafetensorsWriter(self.model_dir / file, {n: ordered[n] for n in members},
                                                        metadata={"format": "pt"})
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array: Any) -> None:
        self._writers[self.weight_map[name]].write(name, array)

    def close(self) -> None:
        passthrough = list(self.base.passthrough)
        if passthrough:
            for name, array in self.base.read(passthrough).items():
                self.write(name, array)
        for writer in self._writers.values():
            writer.close()
        if len(self._writers) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.model_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()

    def provenance(self) -> dict[str, Any]:
        """What `merge_info.json` records about the written directory."""
        return {
            "format": "subboost.huggingface/1",
            "shards": sorted(set(self.weight_map.values())),
            "passed_through": sorted(self.base.passthrough),
            "tied_not_written": dict(self.base.tied),
            "base_files_not_copied": self.left_out,
        }


def output_writer(directory: Path, specs: Mapping[str, tuple[tuple[int, ...], Any]], *, base: CheckpointReader,
                  content: str, metadata: Mapping[str, str], shard_bytes: int | None,
                  params_file: str) -> Any:
    """The writer of a streaming merge's output: a Hugging Face directory for merged parameters of an
    `HuggingFaceReader` base, else subboost's ``params_file`` (task vectors, other formats)."""
    if isinstance(base, HuggingFaceReader) and content == "params":
        return HuggingFaceWriter(directory, base, specs, shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES)
    return SafetensorsWriter(directory / params_file, specs, metadata=metadata)


def default_is_matrix_of(reader: CheckpointReader) -> Callable | None:
    """The matrix predicate a reader's names call for (`huggingface_is_matrix`), or None for the default."""
    return reader.is_matrix if isinstance(reader, HuggingFaceReader) else None


def name_rules(reader: CheckpointReader, record: Any, method_kwargs: Mapping[str, Any],
               boost_options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A merge's hyper-parameters with the reader's matrix predicate where the user gave none.

    A Hugging Face base's tensor names need its family rules (`huggingface_is_matrix`) to
    select matrices; every other format keeps subboost's default predicate.

    Args:
      reader: the base's reader.
      record: the merge method's registry record (`subboost.merging.registry.MergeMethod`).
      method_kwargs: the method's hyper-parameters.
      boost_options: complete `subboost.subspace_boost` keywords, or None (no boosting).
    """
    method_kwargs = dict(method_kwargs)
    predicate = default_is_matrix_of(reader)
    if predicate is None:
        return method_kwargs, None if boost_options is None else dict(boost_options)
    if (record.matrix_kernel is not None and method_kwargs.get("is_matrix") is None
            and "is_matrix" in record.arguments(method_kwargs)):
        method_kwargs["is_matrix"] = predicate
    if boost_options is not None and boost_options.get("is_matrix") is None:
        boost_options = {**boost_options, "is_matrix": predicate}
    return method_kwargs, None if boost_options is None else dict(boost_options)


__all__ = [
    "CONV1D_MODEL_TYPES",
    "DEFAULT_SHARD_BYTES",
    "HEAD_MODULES",
    "HuggingFaceReader",
    "HuggingFaceWriter",
    "attention_block",
    "attention_heads",
    "default_is_matrix_of",
    "huggingface_is_matrix",
    "is_huggingface_dir",
    "matrix_layout",
    "model_folder",
    "name_rules",
    "open_huggingface",
    "output_writer",
    "parse_size",
    "plan_shards",
    "read_config",
    "read_huggingface",
]
