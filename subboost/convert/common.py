"""What every converter shares: checked tensor access, PyTorch -> Flax layout rules, hashing.

Layout rules (PyTorch -> Flax):

* ``Linear`` weight ``(out, in)`` -> Dense kernel ``W^T`` ``(in, out)``;
* ``Conv2d`` weight ``OIHW`` -> ``HWIO``;
* attention: the fused ``in_proj_weight`` ``(3w, w)`` is split into ``W_q, W_k, W_v`` and
  each becomes a ``(w, heads, head_dim)`` kernel ``W^T.reshape(w, heads, head_dim)`` (torch
  splits the projected embedding into heads as contiguous blocks of ``head_dim``); biases
  ``(heads, head_dim)``; ``out_proj`` ``(w, w)`` -> ``W^T.reshape(heads, head_dim, w)``;
* ``LayerNorm`` weight -> ``scale``, bias -> ``bias``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from subboost.models.clip_vit import CLIPVisionConfig, get_config
from subboost.errors import SubboostError


class ConversionError(SubboostError):
    """A checkpoint that cannot be converted: missing / unexpected keys, wrong shapes, ..."""


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{f', ... and {len(items) - limit} more' if len(items) > limit else ''}]"


class TensorSource:
    """Checked access to a flat ``{name: array}`` dict under a key prefix.

    `get` records every key the converter expects with its shape and returns a zero
    placeholder for a missing or misshapen tensor, so one pass collects *all* problems;
    `finish` then raises one `ConversionError` listing missing keys, unexpected keys and
    shape mismatches (full key names).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], *, source: str, prefix: str = "", what: str = ""):
        self.tensors = tensors
        self.source = source
        self.prefix = prefix
        self.what = what
        self.used: set[str] = set()
        self.ignored: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def has(self, key: str) -> bool:
        return self.prefix + key in self.tensors

    def shape(self, key: str) -> tuple[int, ...] | None:
        full = self.prefix + key
        return tuple(self.tensors[full].shape) if full in self.tensors else None

    def get(self, key: str, shape: tuple[int, ...], *, prefix: str | None = None) -> np.ndarray:
        full = (self.prefix if prefix is None else prefix) + key
        self.used.add(full)
        if full not in self.tensors:
            self.missing.append(full)
            return np.zeros(shape, np.float32)
        value = self.tensors[full]
        if tuple(value.shape) != tuple(shape):
            self.mismatched.append(f"{full!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
            return np.zeros(shape, value.dtype)
        return value

    def ignore(self, predicate: Callable[[str], bool]) -> list[str]:
        """Marks keys (full names) as deliberately not converted; returns them."""
        keys = [k for k in self.tensors if k not in self.used and predicate(k)]
        self.ignored.update(keys)
        return keys

    def finish(self) -> None:
        unexpected = [k for k in self.tensors if k not in self.used and k not in self.ignored]
        problems = []
        if self.missing:
            problems.append(f"missing keys {_listing(self.missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listing(unexpected)}")
        if self.mismatched:
            problems.append("wrong shapes: " + "; ".join(self.mismatched[:20])
                            + (f"; ... and {len(self.mismatched) - 20} more" if len(self.mismatched) > 20 else ""))
        if problems:
            raise ConversionError(
                f"{self.source}: cannot convert{f' ({self.what})' if self.what else ''}: " + "; ".join(problems) + "."
            )


# ----------------------------------------------------------------------------
# Layout rules
# ----------------------------------------------------------------------------
def dense(src: TensorSource, key: str, in_dim: int, out_dim: int, *, bias: bool = True) -> dict:
    """``Linear`` ``key.weight (out, in)``, ``key.bias`` -> ``{"kernel": (in, out), "bias"}``."""
    out = {"kernel": np.ascontiguousarray(src.get(f"{key}.weight", (out_dim, in_dim)).T)}
    if bias:
        out["bias"] = src.get(f"{key}.bias", (out_dim,))
    return out


def layer_norm(src: TensorSource, key: str, dim: int) -> dict:
    return {"scale": src.get(f"{key}.weight", (dim,)), "bias": src.get(f"{key}.bias", (dim,))}


def patch_conv(src: TensorSource, key: str, config: CLIPVisionConfig) -> dict:
    """``Conv2d`` weight ``OIHW`` -> ``HWIO`` kernel (CLIP's patch embedding has no bias)."""
    p = config.patch_size
    weight = src.get(key, (config.width, config.in_channels, p, p))
    return {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0))}


def heads_in(weight: np.ndarray, bias: np.ndarray, heads: int) -> dict:
    """One of q / k / v: ``W (w, w)``, ``b (w,)`` -> kernel ``(w, heads, head_dim)``, bias ``(heads, head_dim)``."""
    width = weight.shape[1]
    head_dim = weight.shape[0] // heads
    return {
        "kernel": np.ascontiguousarray(weight.T).reshape(width, heads, head_dim),
        "bias": bias.reshape(heads, head_dim),
    }


def heads_out(weight: np.ndarray, bias: np.ndarray, heads: int) -> dict:
    """``out_proj``: ``W (w, w)`` -> kernel ``(heads, head_dim, w)``, bias ``(w,)``."""
    width = weight.shape[0]
    return {"kernel": np.ascontiguousarray(weight.T).reshape(heads, weight.shape[1] // heads, width), "bias": bias}


def fused_attention(src: TensorSource, key: str, config: CLIPVisionConfig) -> dict:
    """``nn.MultiheadAttention`` (``in_proj_weight (3w, w)``, ``out_proj``) -> query / key / value / out."""
    w, h = config.width, config.heads
    in_w = src.get(f"{key}.in_proj_weight", (3 * w, w))
    in_b = src.get(f"{key}.in_proj_bias", (3 * w,))
    out = {name: heads_in(in_w[i * w:(i + 1) * w], in_b[i * w:(i + 1) * w], h)
           for i, name in enumerate(("query", "key", "value"))}
    out["out"] = heads_out(src.get(f"{key}.out_proj.weight", (w, w)), src.get(f"{key}.out_proj.bias", (w,)), h)
    return out


def vision_tower(src: TensorSource, config: CLIPVisionConfig, names: Mapping[str, str], *, blocks: dict,
                 proj: str | np.ndarray) -> dict:
    """The Flax CLIP vision tower's parameters around its ``blocks`` (already converted).

    ``names`` maps ``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre`` and
    ``ln_post`` to the source's keys (its other entries are `vision_blocks`'); ``proj`` is the
    projection's key (read as ``(width, embed_dim)``) or the projection itself.
    """
    w = config.width
    return {
        "conv1": patch_conv(src, names["conv1"], config),
        "class_embedding": src.get(names["class_embedding"], (w,)),
        "positional_embedding": src.get(names["positional_embedding"], (config.num_tokens, w)),
        "ln_pre": layer_norm(src, names["ln_pre"], w),
        "transformer": blocks,
        "ln_post": layer_norm(src, names["ln_post"], w),
        "proj": src.get(proj, (w, config.embed_dim)) if isinstance(proj, str) else proj,
    }


def vision_blocks(src: TensorSource, config: CLIPVisionConfig, names: Mapping[str, str], *,
                  attention: Callable[..., dict]) -> dict:
    """The Flax tower's ``transformer`` parameters, ``{"resblocks_{i}": ...}`` for every block.

    ``names`` maps ``resblocks`` (the blocks' key prefix, before the index) and, within
    a block, ``ln_1``, ``attn``, ``ln_2``, ``c_fc`` and ``c_proj`` to the source's keys;
    ``attention(src, key, config=config)`` reads one block's attention.
    """
    w, m = config.width, config.hidden_dim
    blocks = {}
    for i in range(config.layers):
        b = f"{names['resblocks']}{i}."
        blocks[f"resblocks_{i}"] = {
            "ln_1": layer_norm(src, b + names["ln_1"], w),
            "attn": attention(src, b + names["attn"], config=config),
            "ln_2": layer_norm(src, b + names["ln_2"], w),
            "mlp": {"c_fc": dense(src, b + names["c_fc"], w, m), "c_proj": dense(src, b + names["c_proj"], m, w)},
        }
    return blocks


def separate_attention(src: TensorSource, key: str, names: Mapping[str, str], config: Any) -> dict:
    """Separate ``q/k/v/out`` Linear layers (``names``: flax name -> torch name) -> query / key / value / out.

    ``config``: any model config with ``width`` and ``heads`` (CLIP vision tower, BERT).
    """
    w, h = config.width, config.heads
    out = {}
    for flax_name in ("query", "key", "value"):
        torch_name = f"{key}.{names[flax_name]}"
        out[flax_name] = heads_in(src.get(f"{torch_name}.weight", (w, w)), src.get(f"{torch_name}.bias", (w,)), h)
    torch_name = f"{key}.{names['out']}"
    out["out"] = heads_out(src.get(f"{torch_name}.weight", (w, w)), src.get(f"{torch_name}.bias", (w,)), h)
    return out


def count_blocks(names: Iterable[str], prefix: str, *, source: str = "checkpoint") -> int:
    """Number of consecutive indices ``i`` with keys ``{prefix}{i}.*`` (0 if none); ``source`` names the file."""
    indices = set()
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    if indices and indices != set(range(max(indices) + 1)):
        gaps = sorted(set(range(max(indices) + 1)) - indices)
        raise ConversionError(f"{source}: blocks {prefix}{{i}} are not numbered 0..{max(indices)}: missing {gaps}.")
    return len(indices)


# ----------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------
INFERRED_FIELDS = ("image_size", "patch_size", "width", "layers", "embed_dim", "in_channels", "mlp_dim")


def resolve_config(
    inferred: Mapping[str, int],
    *,
    source: str,
    config: CLIPVisionConfig | str | None = None,
    hints: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[CLIPVisionConfig, list[str]]:
    """The architecture of a checkpoint: shapes it implies, plus what weights cannot tell.

    ``inferred`` are fields read off tensor shapes. ``heads`` and ``act`` are not visible in
    the weights: they come from ``overrides`` (the caller), else ``hints`` (e.g. attributes of
    a pickled module, a Hugging Face config.json), else ``config``, else CLIP's conventions
    (``heads = width / 64``; QuickGELU as in OpenAI CLIP) — recorded in the returned notes.
    Any field given by the caller that contradicts the weights is an error.
    """
    hints = dict(hints or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(config, str):
        config = get_config(config)
    notes: list[str] = []
    fields = dict(inferred)
    width = fields["width"]
    if fields.get("mlp_dim") == int(round(width * 4.0)):
        fields["mlp_dim"] = None  # canonical: mlp_ratio 4
    for name, value in overrides.items():
        if name in fields and name != "mlp_dim" and value != fields[name]:
            raise ConversionError(f"{source}: {name}={value!r} was requested but the weights have {name}={fields[name]}.")
    if config is not None:
        mismatches = []
        for name in INFERRED_FIELDS:
            mine = fields[name] if name != "mlp_dim" else (fields["mlp_dim"] or int(round(width * 4.0)))
            theirs = getattr(config, name) if name != "mlp_dim" else config.hidden_dim
            if mine != theirs:
                mismatches.append(f"{name} is {mine} in the checkpoint, {theirs} in the config")
        if mismatches:
            raise ConversionError(f"{source}: the weights do not match the requested config: {'; '.join(mismatches)}.")
    for name in ("heads", "act"):
        if name in overrides:
            fields[name] = overrides[name]
        elif name in hints:
            fields[name] = hints[name]
        elif config is not None:
            fields[name] = getattr(config, name)
        elif name == "heads":
            if width % 64:
                raise ConversionError(
                    f"{source}: cannot tell the number of attention heads from the weights (width {width} is not a "
                    "multiple of CLIP's head width 64); pass heads=N (--heads N) or a named config."
                )
            fields["heads"] = width // 64
            notes.append(f"heads={width // 64} assumed (CLIP convention: head width 64)")
        else:
            fields["act"] = "quick_gelu"
            notes.append("act=quick_gelu assumed (OpenAI CLIP); pass act='gelu' for open_clip models trained with nn.GELU")
    extra = sorted(set(overrides) - set(fields) - {"mlp_ratio"})
    if extra:
        raise ConversionError(f"{source}: unknown architecture fields {extra}.")
    try:
        return CLIPVisionConfig(**fields), notes
    except ValueError as err:
        raise ConversionError(f"{source}: {err}") from err


def config_name(config: CLIPVisionConfig) -> str | None:
    from subboost.models.clip_vit import available_configs

    for name in available_configs():
        if get_config(name) == config:
            return name
    return None


# ----------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------
def finalize(params: Any, *, source: str, dtype: Any = None) -> Any:
    """Casts to ``dtype`` (if given) and checks every leaf is finite, naming the first that is not."""
    import jax

    from subboost.tree import leaves_with_paths

    if dtype is not None:
        if isinstance(dtype, str) and dtype.lower() == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        try:
            dtype = np.dtype(dtype)
        except TypeError as err:
            raise ConversionError(f"unknown dtype {dtype!r} (e.g. float32, float16, bfloat16).") from err
        if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
            raise ConversionError(f"dtype must be a floating-point type, got {dtype}.")
        params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)
    for path, leaf in leaves_with_paths(params):
        values = np.asarray(leaf)
        if not np.issubdtype(values.dtype, np.floating) and values.dtype.name != "bfloat16":
            raise ConversionError(f"{source}: parameter {path!r} has non-float dtype {values.dtype}.")
        if not np.isfinite(values.astype(np.float32)).all():
            raise ConversionError(f"{source}: parameter {path!r} contains NaN or infinite values.")
    return params


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    from subboost.files import check_regular_file

    check_regular_file(path, what="source file")  # a FIFO would block
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    return {"path": str(path.absolute()), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


@dataclasses.dataclass
class Converted:
    """A converted checkpoint in memory.

    Attributes:
      params: the Flax parameter tree (numpy arrays).
      kind: ``"clip_vision"``, ``"bert"`` or ``"classification_head"``.
      config: the `CLIPVisionConfig` of a vision tower, the `BertConfig` of a BERT (None for a head).
      metadata: what goes to ``subboost.json`` (architecture, source files and hashes, notes).
    """

    params: Any
    kind: str
    config: Any
    metadata: dict[str, Any]
