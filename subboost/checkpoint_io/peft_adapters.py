"""PEFT LoRA adapters on disk: read ``adapter_config.json`` + weights, write new adapters.

A LoRA adapter replaces a module's weight ``W`` (PyTorch orientation ``(out, in)``) by::

    W + scale * B A,    B: (out, r),  A: (r, in)
    scale = lora_alpha / r          (lora_alpha / sqrt(r) with ``use_rslora``)

per target module, with ``r`` and ``lora_alpha`` overridden per module by
``rank_pattern`` / ``alpha_pattern`` (keys are module names or regular
expressions matched against the end of the module name, the first match wins,
as in peft). Embedding layers store ``lora_embedding_A (r, num_embeddings)`` and
``lora_embedding_B (dim, r)`` and their update is ``(B A)^T``; modules of GPT-2's
``Conv1D`` (``fan_in_fan_out``) hold ``(in, out)`` weights, so theirs is
``(B A)^T`` too: `LoraModule.transposed` records it.

Weights come from ``adapter_model.safetensors`` or, failing that,
``adapter_model.bin`` (read by the restricted unpickler of
`subboost.convert.torch_pickle`, never by plain ``pickle``). Their keys are
``base_model.model.<module>.lora_A.weight`` (peft drops the adapter name on
save). What the merge cannot represent is refused with one line naming the
adapter and the module: DoRA magnitudes, LoRA biases, ``modules_to_save``
copies, convolutions, ranks that disagree with the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from subboost.checkpoint_io.safetensors_format import save_safetensors
from subboost.errors import SubboostError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# (A key, B key) per module kind.
FACTOR_KEYS = {"linear": ("lora_A", "lora_B"), "embedding": ("lora_embedding_A", "lora_embedding_B")}


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted module: its update is ``scale * B A`` (transposed when ``transposed``).

    Attributes:
      name: the module's name in the base model (``encoder.layer.0.attention.self.query``).
      lora_a: ``A``, shape ``(r, in)``.
      lora_b: ``B``, shape ``(out, r)``.
      scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rslora).
      kind: ``"linear"`` or ``"embedding"``.
      transposed: the base weight is ``(in, out)`` (embeddings, ``fan_in_fan_out``):
        its update is ``(scale * B A)^T``.
    """

    name: str
    lora_a: np.ndarray
    lora_b: np.ndarray
    scale: float
    kind: str = "linear"
    transposed: bool = False

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the update ``B A`` (before any transposition)."""
        return int(self.lora_b.shape[0]), int(self.lora_a.shape[1])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight the update is added to."""
        return self.shape[::-1] if self.transposed else self.shape

    def update(self, dtype: Any = np.float32) -> np.ndarray:
        """The dense update in the base weight's orientation: ``scale * B A`` (or its transpose)."""
        delta = self.scale * (self.lora_b.astype(np.float32) @ self.lora_a.astype(np.float32))
        return (delta.T if self.transposed else delta).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from disk.

    Attributes:
      source: where it was read from (used in messages).
      config: ``adapter_config.json`` as a dict.
      modules: ``{module name: LoraModule}`` in file order.
    """

    source: str
    config: dict[str, Any]
    modules: dict[str, LoraModule]

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the config, if recorded."""
        return self.config.get("base_model_name_or_path")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding ``adapter_config.json``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The key of ``patterns`` that applies to module ``name``, as peft resolves it.

    The first key ``k`` (in order) with ``re.fullmatch(rf"(.*\\.)?({k})", name)``: a
    regex matched against the end of the name, on a dot boundary (peft's
    ``get_pattern_key``). ``None``: no key applies.
    """
    for key in patterns:
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return key
    return None


def module_scale(config: Mapping[str, Any], name: str, *, source: str = "adapter") -> tuple[int, float, float]:
    """``(r, lora_alpha, scale)`` of module ``name`` under ``config`` (patterns applied)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(list(rank_pattern), name)
    a_key = pattern_key(list(alpha_pattern), name)
    r = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise SubboostError(f"{source}: module {name!r}: rank r must be a positive integer, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SubboostError(f"{source}: module {name!r}: lora_alpha must be a finite number, got {alpha!r}.")
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, float(alpha), float(scale)


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter directory ``path``, checked to be a LoRA config."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise SubboostError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE}).")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{file}: cannot read it as JSON ({err}).") from err
    if not isinstance(config, dict):
        raise SubboostError(f"{file}: not a JSON object.")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise SubboostError(f"{path}: a {peft_type} adapter; only LoRA adapters can be merged.")
    if config.get("use_dora"):
        raise SubboostError(f"{path}: a DoRA adapter (use_dora=true): its magnitude vectors make the update "
                            "non-linear in B A; only plain LoRA can be merged.")
    if config.get("bias", "none") != "none":
        raise SubboostError(f"{path}: bias={config['bias']!r}: adapters that train biases are not supported "
                            "(only bias='none').")
    if config.get("modules_to_save"):
        raise SubboostError(f"{path}: modules_to_save={config['modules_to_save']!r}: full copies of modules are "
                            "not supported; merge adapters without them.")
    return config


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """``{key: array}`` from ``adapter_model.safetensors`` (else ``adapter_model.bin``)."""
    safetensors_file, bin_file = path / SAFETENSORS_FILE, path / BIN_FILE
    if safetensors_file.is_file():
        from subboost.checkpoint_io.readers import SafetensorsReader

        reader = SafetensorsReader(safetensors_file)
        return reader.read(list(reader.specs))
    if bin_file.is_file():
        from subboost.convert.torch_pickle import load_torch_file, state_dict, to_numpy

        tensors, _ = state_dict(load_torch_file(bin_file), source=str(bin_file))
        return {name: to_numpy(t) for name, t in tensors.items()}
    raise SubboostError(f"{path}: neither {SAFETENSORS_FILE} nor {BIN_FILE} found.")


_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def read_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Reads a PEFT LoRA adapter directory.

    Args:
      path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
        (or ``adapter_model.bin``).

    Returns:
      A `LoraAdapter` whose modules carry their factors and scales.

    Raises:
      SubboostError: not a (plain) LoRA adapter, a factor missing or of the wrong
        shape, a rank that disagrees with ``r`` / ``rank_pattern``, a tensor that
        is not a LoRA factor (a DoRA magnitude, a bias, a saved module), each
        naming the adapter and the module.
    """
    path = Path(path)
    source = str(path)
    config = read_config(path)
    weights = read_weights(path)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, array in weights.items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            raise SubboostError(f"{source}: tensor {key!r} is not a LoRA factor (lora_A / lora_B); "
                                "DoRA magnitudes, biases and saved modules are not supported.")
        module = match["module"].removeprefix(KEY_PREFIX)
        slot = factors.setdefault(module, {})
        if match["factor"] in slot:
            raise SubboostError(f"{source}: module {module!r}: {match['factor']} occurs twice "
                                "(several adapters in one file?).")
        slot[match["factor"]] = array
    modules = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for name, slot in factors.items():
        kind = "embedding" if "lora_embedding_A" in slot or "lora_embedding_B" in slot else "linear"
        a_key, b_key = FACTOR_KEYS[kind]
        if a_key not in slot or b_key not in slot:
            missing = a_key if a_key not in slot else b_key
            raise SubboostError(f"{source}: module {name!r}: {missing} is missing.")
        a, b = slot[a_key], slot[b_key]
        if a.ndim != 2 or b.ndim != 2:
            raise SubboostError(f"{source}: module {name!r}: factors of shapes {a.shape} and {b.shape}; only "
                                "linear and embedding modules (2-D factors) are supported, not convolutions.")
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            raise SubboostError(f"{source}: module {name!r}: {a_key} has dtype {a.dtype.name}, not a float type.")
        if a.shape[0] != b.shape[1]:
            raise SubboostError(f"{source}: module {name!r}: {a_key} {a.shape} and {b_key} {b.shape} disagree on "
                                f"the rank ({a.shape[0]} vs {b.shape[1]}).")
        r, _, scale = module_scale(config, name, source=source)
        if a.shape[0] != r:
            raise SubboostError(f"{source}: module {name!r}: its factors have rank {a.shape[0]} but the config "
                                f"gives r = {r} (r / rank_pattern).")
        if kind == "embedding":  # peft: A (r, num_embeddings), B (dim, r), update (B A)^T
            modules[name] = LoraModule(name, a, b, scale, kind="embedding", transposed=True)
        else:
            modules[name] = LoraModule(name, a, b, scale, kind="linear", transposed=fan_in_fan_out)
    if not modules:
        raise SubboostError(f"{source}: the adapter holds no LoRA factors.")
    return LoraAdapter(source, config, modules)


def write_adapter(
    path: str | os.PathLike,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    template: LoraAdapter,
    rank: int,
    dtype: Any = np.float32,
) -> None:
    """Writes a PEFT adapter whose module ``name`` has update ``B A`` exactly (scale 1).

    ``lora_alpha = r = rank`` (scale 1, rslora off), so ``factors[name] = (A, B)``
    with ``A (rank, in)`` and ``B (out, rank)`` give the update ``B A`` of the
    module in ``(out, in)`` orientation. Everything else in the config (target
    modules, fan_in_fan_out, base model, task type) is copied from ``template``.
    Writes into the directory ``path``, which must exist (callers stage it).
    """
    path = Path(path)
    config = dict(template.config)
    config.update(r=int(rank), lora_alpha=int(rank), use_rslora=False, rank_pattern={}, alpha_pattern={})
    arrays: dict[str, np.ndarray] = {}
    for name, (a, b) in factors.items():
        module = template.modules[name]
        a_key, b_key = FACTOR_KEYS[module.kind]
        suffix = ".weight" if module.kind == "linear" else ""  # embedding factors are bare parameters in peft
        arrays[f"{KEY_PREFIX}{name}.{a_key}{suffix}"] = np.ascontiguousarray(a, dtype=dtype)
        arrays[f"{KEY_PREFIX}{name}.{b_key}{suffix}"] = np.ascontiguousarray(b, dtype=dtype)
    save_safetensors(arrays, path / SAFETENSORS_FILE, metadata={"format": "pt"})  # flat: keys kept as they are
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = [
    "CONFIG_FILE",
    "LoraAdapter",
    "LoraModule",
    "is_adapter_dir",
    "module_scale",
    "pattern_key",
    "read_adapter",
    "write_adapter",
]
