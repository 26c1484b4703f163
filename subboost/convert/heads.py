"""Classification heads (``head_{Task}.pt``) -> `ClassificationHead` parameters.

The task-vector codebases save each task's zero-shot head either as a state dict
``{"weight": (classes, embed), "bias": (classes,)}`` or as the whole pickled module (a
``torch.nn.Linear`` subclass with a ``normalize`` flag). Kernel ``= weight^T``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from subboost.convert.common import ConversionError, TensorSource

HEAD_FILE = re.compile(r"^head_(?P<task>.+)\.(pt|pth|bin)$")


def is_head(tensors: Mapping[str, np.ndarray]) -> bool:
    return "weight" in tensors and set(tensors) <= {"weight", "bias"} and np.ndim(tensors["weight"]) == 2


def task_name(path: str | Path) -> str | None:
    """``head_MNIST.pt`` -> ``"MNIST"``."""
    match = HEAD_FILE.match(Path(path).name)
    return match.group("task") if match else None


def convert_head(
    tensors: Mapping[str, np.ndarray], *, source: str, normalize: bool | None = None
) -> tuple[dict, dict[str, Any]]:
    """``(params, architecture)`` of a head: ``{"kernel": (embed, classes), "bias": (classes,)}``."""
    weight_shape = tensors["weight"].shape if "weight" in tensors else None
    if weight_shape is None or len(weight_shape) != 2:
        raise ConversionError(
            f"{source}: a classification head needs a 2-D 'weight' (classes, embed_dim); "
            f"found keys {sorted(tensors)[:10]}" + (f", weight shape {tuple(weight_shape)}" if weight_shape else "") + "."
        )
    classes, embed = weight_shape
    src = TensorSource(tensors, source=source, what="classification head")
    weight = src.get("weight", (classes, embed))
    bias = src.get("bias", (classes,)) if "bias" in tensors else np.zeros((classes,), weight.dtype)
    src.finish()
    architecture = {"num_classes": int(classes), "embed_dim": int(embed),
                    "normalize": True if normalize is None else bool(normalize)}
    return {"kernel": np.ascontiguousarray(weight.T), "bias": bias}, architecture
