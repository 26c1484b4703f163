"""Checkpoints read lazily: parameter specs up front, arrays on request, one chunk at a time.

`open_checkpoint` detects the format:

* a ``.safetensors`` file whose keys are parameter paths ``"a/b/c"`` (positioned reads);
* an orbax PyTree checkpoint directory (partial restore of the requested leaves);
* a finished streaming merge output directory (``params.safetensors``, checksums from
  ``merge_info.json``);
* a directory format registered in `DIRECTORY_OPENERS` (Hugging Face model directories,
  `subboost.checkpoint_io.huggingface`);
* a parameter pytree already in memory.

Recorded checksums are verified on every read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from subboost.checkpoint_io.metadata import (
    COMPLETE_MARKER,
    INFO_FILE,
    PARAMS_FILE,
    checkpoint_info,
    is_checkpoint_dir,
    verify_checksums,
)
from subboost.checkpoint_io.orbax_io import quiet_event_loop_noise, short_error
from subboost.checkpoint_io.safetensors_format import SAFETENSORS_DTYPES, read_safetensors_header
from subboost.errors import SubboostError
from subboost.tree import PyTree, leaves_with_paths, nest, path_str


def _tree_order(paths: Sequence[str]) -> list[str]:
    """Paths in the order `jax.tree_util` flattens the nested dict they form."""
    return [p for p, _ in leaves_with_paths(nest({p: p for p in paths}))]


class CheckpointReader:
    """A checkpoint read lazily: parameter specs up front, arrays on request.

    Attributes:
      source: how the checkpoint is named in messages (its path).
      specs: ``{path: jax.ShapeDtypeStruct}`` in tree-flatten order.
    """

    source: str
    specs: dict[str, jax.ShapeDtypeStruct]

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class SafetensorsReader(CheckpointReader):
    """Positioned reads of single tensors from a safetensors file (no memory map)."""

    def __init__(self, path: str | os.PathLike, *, checksums: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.source = str(self.path)
        self._checksums = checksums  # recorded by a streaming merge (merge_info.json); verified on read
        header, self._data_start = read_safetensors_header(self.path)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.metadata = header.get("__metadata__", {})
        self._entries = entries
        self.specs = {
            name: jax.ShapeDtypeStruct(tuple(entries[name]["shape"]), SAFETENSORS_DTYPES[entries[name]["dtype"]])
            for name in _tree_order(list(entries))
        }

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        with open(self.path, "rb") as f:
            for name in names:
                entry = self._entries[name]
                array = np.empty(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
                buffer = array.reshape(-1).view(np.uint8)
                f.seek(self._data_start + entry["data_offsets"][0])
                if f.readinto(buffer) != buffer.size:
                    raise SubboostError(f"{self.source}: parameter {name!r}: unexpected end of file.")
                out[name] = array
        verify_checksums(self.source, out, self._checksums, complete=False)
        return out


class OrbaxReader(CheckpointReader):
    """Orbax PyTree checkpoint read by partial restore (only the requested leaves)."""

    def __init__(self, path: str | os.PathLike):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.path = Path(path).absolute()
        self.source = str(path)
        self._checkpointer = ocp.PyTreeCheckpointer()
        try:
            metadata = self._checkpointer.metadata(self.path)
        except Exception as err:  # orbax raises many types for a damaged directory
            raise SubboostError(f"{self.source}: cannot read the orbax checkpoint metadata ({err}).") from err
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        self.specs = {}
        for name, leaf in leaves_with_paths(tree):
            shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
            if shape is None or dtype is None:
                raise SubboostError(f"{self.source}: parameter {name!r} is not an array ({type(leaf).__name__}).")
            self.specs[name] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
        self._metadata_tree = tree
        info = checkpoint_info(self.path)
        self._checksums = None if info is None else info.get("checksums")

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        ocp = self._ocp
        wanted = set(names)
        as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
        placeholder = getattr(ocp, "PLACEHOLDER", None)
        if placeholder is not None:  # keeps the saved structure; skipped leaves are never read
            item = jax.tree_util.tree_map_with_path(
                lambda p, _: 0 if path_str(p) in wanted else placeholder, self._metadata_tree
            )
            restore_args = jax.tree_util.tree_map_with_path(
                lambda p, _: as_numpy if path_str(p) in wanted else placeholder, self._metadata_tree
            )
            args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        else:  # older orbax: restore a nested-dict subset
            item = nest({n: 0 for n in names})
            args = ocp.args.PyTreeRestore(item=item, restore_args=nest({n: as_numpy for n in names}),
                                          partial_restore=True)
        try:
            with quiet_event_loop_noise(self.path):
                restored = self._checkpointer.restore(self.path, args=args)
        except Exception as err:
            self.close()  # stops orbax's event loop cleanly (else "Event loop is closed" tracebacks at exit)
            raise SubboostError(
                f"{self.source}: cannot restore parameters {sorted(wanted)[:3]}"
                f"{' ...' if len(wanted) > 3 else ''} ({type(err).__name__}: {short_error(err)}); "
                "the checkpoint is damaged or incomplete."
            ) from err
        out = {p: np.asarray(x) for p, x in leaves_with_paths(restored) if p in wanted}
        missing = wanted.difference(out)
        if missing:
            raise SubboostError(f"{self.source}: restore did not return parameters {sorted(missing)[:5]}.")
        verify_checksums(self.source, out, self._checksums, complete=False)
        return out

    def close(self) -> None:
        if hasattr(self._checkpointer, "close"):
            self._checkpointer.close()


class TreeReader(CheckpointReader):
    """A parameter pytree already in memory, read like a checkpoint."""

    def __init__(self, tree: PyTree, *, source: str = "base (in memory)"):
        self.source = source
        self._leaves = dict(leaves_with_paths(tree))
        self.specs = {
            p: jax.ShapeDtypeStruct(tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))
            for p, x in self._leaves.items()
        }

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: np.asarray(self._leaves[name]) for name in names}


# Readers of further directory formats: ``opener(path) -> reader``, or None when ``path`` is not theirs.
# `subboost.checkpoint_io.huggingface` registers Hugging Face model directories (tried first).
DIRECTORY_OPENERS: list[Callable[[Path], "CheckpointReader | None"]] = []


def open_checkpoint(source: str | os.PathLike | PyTree) -> CheckpointReader:
    """A lazy reader for a checkpoint path (format detected) or an in-memory pytree."""
    if isinstance(source, CheckpointReader):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return TreeReader(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    if path.is_file():
        return SafetensorsReader(path)
    if not path.is_dir():
        raise SubboostError(f"{path}: not a checkpoint (neither a .safetensors file nor a directory).")
    for opener in DIRECTORY_OPENERS:
        reader = opener(path)
        if reader is not None:
            return reader
    if (path / PARAMS_FILE).exists() or (path / INFO_FILE).exists():
        if not (path / COMPLETE_MARKER).exists():
            raise SubboostError(
                f"{path}: merge output without a {COMPLETE_MARKER} marker (an interrupted run?); re-run the merge."
            )
        try:
            checksums = json.loads((path / INFO_FILE).read_text()).get("checksums")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            raise SubboostError(f"{path / INFO_FILE}: unreadable merge metadata ({err}).") from err
        return SafetensorsReader(path / PARAMS_FILE, checksums=checksums)
    if is_checkpoint_dir(path):
        return OrbaxReader(path)
    try:
        candidates = [p for p in sorted(path.iterdir()) if p.is_dir() and is_checkpoint_dir(p)]
    except OSError as err:
        raise SubboostError(f"{path}: cannot read the directory ({err}).") from err
    if len(candidates) == 1:  # e.g. a checkpoint saved as one named item
        return OrbaxReader(candidates[0])
    raise SubboostError(
        f"{path}: unknown checkpoint format (expected a .safetensors file, an orbax checkpoint "
        f"directory, a subboost merge output directory or a Hugging Face model directory)."
    )


def read_params(source: str | os.PathLike, names: Sequence[str] | None = None) -> dict:
    """Reads a whole checkpoint (or the parameters ``names``) into a nested dict of arrays."""
    reader = open_checkpoint(source)
    names = list(reader.specs) if names is None else list(names)
    unknown = [n for n in names if n not in reader.specs]
    if unknown:
        raise SubboostError(f"{reader.source}: no parameters {unknown[:5]}.")
    return nest(reader.read(names))


__all__ = [
    "DIRECTORY_OPENERS",
    "CheckpointReader",
    "OrbaxReader",
    "SafetensorsReader",
    "TreeReader",
    "open_checkpoint",
    "read_params",
]
