"""Parameters split over several safetensors files ("shards") with one JSON index.

A multi-process merge (`subboost.streaming.pod`) writes one shard per process::

    out/params-00001-of-00004.safetensors      # the parameters process 0 merged
    ...
    out/params-00004-of-00004.safetensors
    out/params.safetensors.index.json          # {"metadata": {...}, "weight_map": {path: shard file}}

The index has the layout of Hugging Face's ``model.safetensors.index.json``; keys are
parameter paths ``"a/b/c"``. `ShardedReader` reads such a directory lazily, each
parameter from its own shard by positioned reads (`open_checkpoint` returns one for a
merge output directory holding an index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from subboost.errors import SubboostError
from subboost.tree import leaves_with_paths, nest

SHARD_INDEX_FILE = "params.safetensors.index.json"


def shard_file_name(index: int, count: int) -> str:
    """``"params-00001-of-00004.safetensors"`` for shard ``index`` (from 0) of ``count``."""
    return f"params-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard_index(path: str | os.PathLike, weight_map: Mapping[str, str], *,
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Writes the index ``{"metadata": ..., "weight_map": {parameter path: shard file name}}``."""
    path = Path(path)
    path.write_text(json.dumps({"metadata": dict(metadata or {}), "weight_map": dict(weight_map)}, indent=2))
    return path


def read_shard_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` of an index, checked; `SubboostError` naming the file if malformed."""
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{path}: unreadable shard index ({err}).") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SubboostError(f"{path}: not a shard index (no 'weight_map' of parameter -> file name).")
    for name, file in weight_map.items():
        if Path(file).name != file:
            raise SubboostError(f"{path}: parameter {name!r} points outside the directory ({file!r}).")
    return weight_map


class ShardedReader:
    """A sharded checkpoint read lazily: each parameter from the shard the index names.

    Has the `subboost.checkpoint_io.readers.CheckpointReader` interface (``source``,
    ``specs`` in tree-flatten order, ``read(names)``).

    Args:
      index_path: the index file; shards lie next to it.
      open_shard: opens one shard file as a reader (e.g. a ``SafetensorsReader``).
    """

    def __init__(self, index_path: str | os.PathLike, *, open_shard: Callable[[Path], Any]):
        index_path = Path(index_path)
        self.source = str(index_path.parent)
        weight_map = read_shard_index(index_path)
        self._shards: dict[str, Any] = {}
        for file in dict.fromkeys(weight_map.values()):
            shard = index_path.parent / file
            if not shard.is_file():
                raise SubboostError(f"{index_path}: shard {file!r} is missing.")
            self._shards[file] = open_shard(shard)
        specs: dict[str, jax.ShapeDtypeStruct] = {}
        for file, reader in self._shards.items():
            for name, spec in reader.specs.items():
                if weight_map.get(name) != file:
                    where = "not in the index" if name not in weight_map else f"indexed in {weight_map[name]!r}"
                    raise SubboostError(f"{index_path}: parameter {name!r} of shard {file!r} is {where}.")
                specs[name] = spec
        absent = [name for name in weight_map if name not in specs]
        if absent:
            raise SubboostError(f"{index_path}: parameters {absent[:5]} are indexed but absent from their shards.")
        self._file_of = weight_map
        self.specs = {name: specs[name] for name, _ in leaves_with_paths(nest({n: n for n in specs}))}

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self._file_of[name], []).append(name)
        out: dict[str, np.ndarray] = {}
        for file, members in by_shard.items():
            out.update(self._shards[file].read(members))
        return {name: out[name] for name in names}


__all__ = ["SHARD_INDEX_FILE", "ShardedReader", "read_shard_index", "shard_file_name", "write_shard_index"]
