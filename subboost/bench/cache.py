"""On-disk cache of the trained models: orbax checkpoints keyed by the training config.

Layout of ``<cache root>/<training key>/`` (the key is the suite's
training key, `source_key` of every training setting, the seed and the
training code)::

  base/                 pretrained encoder            (orbax PyTree checkpoint)
  heads/                frozen heads, stacked over tasks: kernel (T, E, C_max), bias (T, C_max)
  experts/<task name>/  fine-tuned encoder of one task
  meta.json             task names, logit scale, training losses and times
  COMPLETE              written last: a directory without it is an interrupted run

Each expert is its own checkpoint, so ``subboost merge --base .../base
.../experts/shapes .../experts/stripes`` works on them directly.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from subboost.bench import label_noise

COMPLETE_MARKER = "COMPLETE"


def source_key(header: dict[str, Any], modules: Sequence[ModuleType]) -> str:
    """A suite's training key: ``sha256(json(header) + source of modules)[:16]``.

    ``header`` holds the seed and the config fields that decide the trained
    models; ``modules`` the generators and training code, so editing them
    invalidates cached checkpoints. Shared by the vision and text suites.
    """
    blob = json.dumps(header, sort_keys=True) + "".join(inspect.getsource(m) for m in modules)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def with_options(config: Any, fields: dict[str, Any], modules: Sequence[ModuleType],
                 variants: ModuleType) -> tuple[dict[str, Any], list[ModuleType]]:
    """A suite's key ``fields`` and ``modules`` with the label noise and the task set (any suite config's
    ``finetune_label_noise`` and ``task_set``) added only when they differ from their defaults, with the
    modules that implement them (`label_noise`, the suite's task-variants module ``variants``): the standard
    suite's keys stay those from before the options existed."""
    fields, modules = {k: v for k, v in fields.items() if k != "finetune_label_noise"}, list(modules)
    if config.finetune_label_noise:
        fields["finetune_label_noise"] = config.finetune_label_noise
        modules.append(label_noise)
    if config.task_set != "standard":
        fields["task_set"] = config.task_set
        modules.append(variants)
    return fields, modules


class ModelCache:
    """Saves and restores base, heads and experts under ``root / key``."""

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self._checkpointer = ocp.PyTreeCheckpointer()

    def complete(self) -> bool:
        return (self.dir / COMPLETE_MARKER).is_file()

    def save(self, *, base: dict, heads: dict, experts: dict, task_names: Sequence[str], meta: dict[str, Any]) -> None:
        """Writes everything (replacing an interrupted, incomplete entry)."""
        if self.dir.exists():
            if self.complete():
                raise FileExistsError(f"model cache {self.dir} is already complete; refusing to overwrite it.")
            shutil.rmtree(self.dir)  # our own interrupted write
        self.dir.mkdir(parents=True)
        self._save(self.dir / "base", base)
        self._save(self.dir / "heads", heads)
        for t, name in enumerate(task_names):
            self._save(self.dir / "experts" / name, jax.tree_util.tree_map(lambda x: x[t], experts))
        (self.dir / "meta.json").write_text(json.dumps({"task_names": list(task_names), **meta}, indent=1))
        (self.dir / COMPLETE_MARKER).write_text("ok\n")

    def load(self) -> tuple[dict, dict, dict, dict[str, Any]]:
        """``(base, heads, experts stacked on axis 0, meta)``."""
        if not self.complete():
            raise FileNotFoundError(f"model cache {self.dir} is missing or incomplete.")
        meta = json.loads((self.dir / "meta.json").read_text())
        base = self._restore(self.dir / "base")
        heads = self._restore(self.dir / "heads")
        experts = [self._restore(self.dir / "experts" / name) for name in meta["task_names"]]
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *experts)
        return base, heads, stacked, meta

    def _save(self, path: Path, tree: dict) -> None:
        self._checkpointer.save(path.resolve(), jax.device_get(tree))

    def _restore(self, path: Path) -> dict:
        return jax.device_get(self._checkpointer.restore(path.resolve()))
