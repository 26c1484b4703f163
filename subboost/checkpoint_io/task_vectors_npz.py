"""Stacked task vectors in one ``.npz`` file: ``"a/b/kernel"`` keys, a leading expert axis.

An optional ``"__names__"`` entry (a string array) names the experts. The file
holds plain arrays only: it is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from subboost.errors import SubboostError
from subboost.tree import PyTree, leaves_with_paths

__all__ = ["NAMES_KEY", "load_task_vectors_npz", "save_task_vectors_npz"]

NAMES_KEY = "__names__"


def save_task_vectors_npz(path: str | os.PathLike, tvs: PyTree, names: Sequence[str] | None = None) -> None:
    """Writes stacked task vectors (nested dicts) to an ``.npz`` with ``"a/b/c"`` keys."""
    arrays = {p: np.asarray(x) for p, x in leaves_with_paths(tvs)}
    if NAMES_KEY in arrays:
        raise SubboostError(f"a parameter is named {NAMES_KEY!r}, which the .npz format reserves.")
    if names is not None:
        arrays[NAMES_KEY] = np.asarray(list(names), dtype=str)
    np.savez(path, **arrays)


def load_task_vectors_npz(path: str | os.PathLike) -> tuple[dict, list[str] | None]:
    """Reads `save_task_vectors_npz` output: (nested dict of arrays, names or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task-vector file {str(path)!r} does not exist.")
    tree: dict = {}
    names = None
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise SubboostError(f"{path}: not a readable .npz of task vectors ({type(err).__name__}: {err}).") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SubboostError(f"{path}: holds a single array, not an .npz archive of named task vectors.")
    with data:
        for key in data.files:
            try:
                value = data[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise SubboostError(f"{path}: entry {key!r} is corrupt ({type(err).__name__}: {err}).") from err
            if key == NAMES_KEY:
                names = [str(n) for n in value]
                continue
            node = tree
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise SubboostError(f"{path}: key {key!r} nests under a parameter.")
            node[leaf] = np.asarray(value)
    if not tree:
        raise SubboostError(f"{path}: holds no task vectors.")
    return tree, names
