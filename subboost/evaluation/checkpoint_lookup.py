"""Encoder and head checkpoints of the paper suites, found by task name, and the encoder's architecture."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from subboost.errors import SubboostError
from subboost.tree import PyTree

__all__ = ["encoder_config", "find_checkpoint", "load_checkpoint", "load_heads"]


def find_checkpoint(root: str | os.PathLike, pattern: str, task: str | None = None) -> Path:
    """``root / pattern.format(task=task)``, as a directory or with a ``.safetensors`` suffix.

    Raises:
      FileNotFoundError: naming both candidate paths.
    """
    path = Path(root) / pattern.format(task=task)
    for candidate in (path, path.with_name(path.name + ".safetensors")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"checkpoint {str(path)!r} (or {path.name}.safetensors) does not exist"
                            + (f" (task {task})" if task else "") + f" under {str(root)!r}.")


def load_checkpoint(path: str | os.PathLike) -> PyTree:
    """Parameters as host numpy arrays (orbax directory, safetensors file or merge output)."""
    from subboost.checkpoints import load_params

    return load_params(path, as_numpy=True)


def encoder_config(backbone: str | None, checkpoint: str | os.PathLike | None = None) -> Any:
    """The `CLIPVisionConfig` of an encoder checkpoint.

    A converted checkpoint records its architecture (``subboost.json``), including
    details a name does not fix (the activation of open_clip's LAION towers); it
    wins, after checking that it agrees with ``backbone`` when both are given.

    Raises:
      SubboostError: neither source, or a checkpoint of another architecture.
    """
    from subboost.checkpoints import checkpoint_info
    from subboost.models.clip_vit import CLIPVisionConfig, get_config

    info = checkpoint_info(checkpoint) if checkpoint is not None and Path(checkpoint).is_dir() else None
    recorded = None
    if info and info.get("kind") == "clip_vision" and info.get("architecture"):
        recorded = CLIPVisionConfig.from_dict(info["architecture"])
    if backbone is None:
        if recorded is None:
            raise SubboostError(f"checkpoint {str(checkpoint)!r} records no architecture: name the backbone "
                                "(ViT-B/32, ViT-B/16, ViT-L/14 or tiny).")
        return recorded
    named = get_config(backbone)
    if recorded is not None:
        if dataclasses.replace(named, act=recorded.act) != recorded:
            raise SubboostError(f"checkpoint {str(checkpoint)!r} holds a {recorded} encoder, "
                                f"not {backbone} ({named}).")
        return recorded
    return named


def load_heads(root: str | os.PathLike, tasks: Sequence[str], pattern: str = "{task}") -> dict[str, PyTree]:
    """``{task: head params}`` from ``root / pattern``; a ``{"params": ...}`` wrapper is removed."""
    heads = {}
    for task in tasks:
        head = load_checkpoint(find_checkpoint(root, pattern, task))
        heads[task] = head["params"] if isinstance(head, Mapping) and set(head) == {"params"} else head
    return heads
