"""The shipped pretrained base: trained once with a larger budget, loaded by every run.

Merging users start from released weights; so does the default benchmark. Its
base encoder is pretrained once (`pretrain_base`, reproduced by
``subboost demo --pretrain-base``) and committed as a small ``.npz`` under
``subboost/bench/bases/`` with its SHA-256 in `SHIPPED_BASES` (`subboost.bench.suites.vision.config`). A run whose
config names a shipped base (`BenchConfig.base`) loads it, checks the checksum
and skips pretraining; a config without one pretrains in the run.

File layout: one array per encoder parameter, named by its path joined with
``/`` (``"transformer/block_0/attn/query/kernel"``), plus ``logit_scale`` (the
pretrained CLIP temperature, a scalar).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from subboost.bench.suites.vision.config import SHIPPED_BASES, BenchConfig
from subboost.bench.suites.vision.splits import PretrainData, build_pretraining_mixture
from subboost.bench.suites.vision.pretrain import pretrain
from subboost.bench.suites.vision.generators import TASKS, Task
from subboost.tree import nest

BASES_DIR = Path(__file__).parent / "bases"
LOGIT_SCALE_KEY = "logit_scale"

def base_path(name: str) -> Path:
    return BASES_DIR / f"{name}.npz"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = np.asarray(value)
    return out


def save_base(path: str | Path, encoder: dict, logit_scale: float) -> str:
    """Writes ``encoder`` and its temperature to ``path`` (``.npz``; refuses to overwrite); returns the SHA-256."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite a base checkpoint.")
    flat = _flatten(jax.device_get(encoder))
    if LOGIT_SCALE_KEY in flat:
        raise ValueError(f"encoder has a parameter named {LOGIT_SCALE_KEY!r}, which the base file reserves.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **flat, **{LOGIT_SCALE_KEY: np.float32(logit_scale)})
    return file_sha256(path)


def load_base(path: str | Path, *, sha256: str | None = None) -> tuple[dict, float]:
    """``(encoder, logit_scale)`` from a base file; with ``sha256``, the file must match it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained base {path} not found; recreate it with `subboost demo --pretrain-base`.")
    if sha256 is not None and (digest := file_sha256(path)) != sha256:
        raise ValueError(f"pretrained base {path} has SHA-256 {digest}, expected {sha256}; the file is corrupt or stale.")
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    scale = float(flat.pop(LOGIT_SCALE_KEY))
    return nest(flat), scale


def load_shipped_base(name: str) -> tuple[dict, float]:
    if name not in SHIPPED_BASES:
        raise ValueError(f"no shipped pretrained base named {name!r}; known: {', '.join(SHIPPED_BASES) or 'none'}.")
    return load_base(base_path(name), sha256=SHIPPED_BASES[name])


def pretraining_mixture(config: BenchConfig, tasks: Sequence[Task], *, seed: int, progress: bool = True) -> PretrainData:
    """The images and captions ``config`` pretrains on: ``tasks``' pretraining streams, in their looks.

    The one place a config's pretraining settings become data, so the shipped base
    (`pretrain_base`) and a run that pretrains in-process (`subboost.bench.pipeline`) see the same.
    """
    return build_pretraining_mixture(tasks, per_task=config.pretrain_per_task, seed=seed,
                                     labels=config.pretrain_labels, style=config.domain_style, progress=progress)


def pretrain_base(config: BenchConfig, *, seed: int, path: str | Path, progress: bool = True, log=print) -> str:
    """Pretrains ``config``'s encoder from scratch (deterministic in ``seed``) and saves it to ``path``; returns its SHA-256."""
    start = time.perf_counter()
    mixture = pretraining_mixture(config, TASKS[: config.num_tasks], seed=seed, progress=progress)
    result = pretrain(config, mixture, seed=seed, progress=progress)
    digest = save_base(path, result.encoder, result.logit_scale)
    log(f"pretrained {config.pretrain_steps} steps in {time.perf_counter() - start:.0f} s "
        f"(loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, logit scale {result.logit_scale:.1f}); "
        f"wrote {path} (sha256 {digest})")
    return digest
