"""What a checkpoint records about itself, and the checks that compare checkpoints.

* ``subboost.json`` inside an orbax checkpoint directory (`checkpoint_info`): ``content``
  (``"params"``, ``"task_vector"`` or ``"head"``), ``kind`` / ``architecture`` where known,
  a CRC-32 ``checksums`` entry per array, provenance;
* ``merge_info.json`` of a streaming merge output directory (``params.safetensors`` +
  ``merge_info.json`` + a ``COMPLETE`` marker);
* the ``__metadata__`` of a ``.safetensors`` file.

`checkpoint_identity` reads whichever applies; `check_same_architecture` and
`check_same_parameters` are the one comparison of an expert with its base (every problem
listed, the file named), used by in-memory loading and by streaming alike.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from subboost.checkpoint_io.safetensors_format import read_safetensors_header
from subboost.errors import SubboostError, format_names
from subboost.files import check_regular_file, describe, read_json

METADATA_FILE = "subboost.json"
FORMAT_VERSION = 2  # 2: content and checksums recorded
CONTENTS: dict[str, str] = {"params": "model parameters", "task_vector": "a task vector", "head": "a classification head"}
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")

# A streaming merge's output directory.
PARAMS_FILE = "params.safetensors"
INFO_FILE = "merge_info.json"
COMPLETE_MARKER = "COMPLETE"

# A parameter's shape and dtype, by path: what comparing two checkpoints needs.
Specs = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an orbax checkpoint directory."""
    path = Path(path)
    return path.is_dir() and any((path / marker).exists() for marker in ORBAX_MARKERS)


def check_leaf_names(key_paths: Sequence[Sequence[str]], *, source: str) -> None:
    """Refuses a tree two of whose leaves would be stored under the same name.

    A leaf is stored twice over: orbax keys it by its path joined with ``"."``, and
    subboost (checksums, safetensors) by its path joined with ``"/"``. So keys
    ``"x.y"`` and ``x -> y`` collide in orbax, ``"a/b"`` and ``a -> b`` in subboost's
    names, and a leaf named like a folder of other leaves (``"a"`` beside ``"a/b"``)
    cannot be nested back. `SubboostError` names both leaves.
    """
    seen: dict[str, dict[str, tuple[str, ...]]] = {".": {}, "/": {}}
    key_paths = [tuple(path) for path in key_paths]
    for path in key_paths:
        if any(key == "" for key in path):
            raise SubboostError(f"{source}: parameter {'/'.join(path)!r} has an empty key; it cannot be stored.")
        for separator, names in seen.items():
            stored = separator.join(path)
            other = names.setdefault(stored, path)
            if other != path:
                raise SubboostError(
                    f"{source}: parameters {_keys(other)} and {_keys(path)} would be stored under the same name "
                    f"{stored!r} (a key holding {separator!r}); rename one of them."
                )
    folders = {"/".join(path[:i]) for path in key_paths for i in range(1, len(path))}
    clashing = [name for name in seen["/"] if name in folders]
    if clashing:
        raise SubboostError(
            f"{source}: parameter {clashing[0]!r} is also the folder of other parameters "
            f"({clashing[0]!r}/...); rename one of them."
        )


def _keys(path: tuple[str, ...]) -> str:
    """A leaf's keys as the user wrote them: ``'x.y'`` or ``'x' -> 'y'``."""
    return " -> ".join(repr(key) for key in path)


def array_checksum(array: np.ndarray) -> str:
    """``"crc32:xxxxxxxx"`` of the array's bytes (C order): what `save_params` records."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return f"crc32:{zlib.crc32(data):08x}"


def verify_checksums(source: str | os.PathLike, arrays: Mapping[str, np.ndarray], checksums: Mapping[str, str] | None,
                     *, complete: bool = True) -> None:
    """Raises `SubboostError` naming ``source`` and the parameter whose bytes changed since the save.

    ``checksums`` is None for checkpoints written before they were recorded (nothing is
    checked). ``complete``: ``arrays`` should be every recorded parameter (False for
    partial reads).
    """
    if checksums is None:
        return
    if not isinstance(checksums, Mapping):
        raise SubboostError(f"{source}: corrupt checkpoint metadata (checksums is a {type(checksums).__name__}).")
    unlisted = [name for name in arrays if name not in checksums]
    if unlisted or (complete and len(arrays) != len(checksums)):
        missing = [name for name in checksums if name not in arrays]
        raise SubboostError(
            f"{source}: the data does not match the checkpoint's recorded parameters "
            f"(not recorded: {format_names(unlisted)}, recorded but absent: {format_names(missing)}); "
            "the checkpoint is damaged."
        )
    for name, array in arrays.items():
        found = array_checksum(np.asarray(array))
        if found != checksums[name]:
            raise SubboostError(
                f"{source}: parameter {name!r} fails its checksum ({found}, recorded {checksums[name]}): "
                "the checkpoint data is corrupt. Re-create or re-copy it."
            )


def default_content(metadata: Mapping[str, Any] | None) -> str:
    """What a checkpoint recording ``metadata`` holds: ``content``, else ``"head"`` for a converter's head, else ``"params"``."""
    if metadata and metadata.get("content") is not None:
        return metadata["content"]
    return "head" if metadata and metadata.get("kind") == "classification_head" else "params"


# Further directory formats that hold model parameters: ``recognise(path) -> format name or None``.
# `subboost.checkpoint_io.huggingface` registers Hugging Face model directories.
DIRECTORY_FORMATS: list = []


def checkpoint_format(path: str | os.PathLike) -> str:
    """How the checkpoint at ``path`` is stored: ``"safetensors"``, ``"merge_output"`` or ``"orbax"``.

    A checkpoint is what its own folder holds: a regular file is a safetensors file; a
    folder holding ``params.safetensors`` or ``merge_info.json`` is a streaming merge
    output; a folder holding orbax's files is an orbax checkpoint. Subfolders are never
    searched, and a folder that is both kinds is refused, so the content and
    architecture read by `checkpoint_identity` are those of the data `open_checkpoint` reads.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {describe(path)!r} does not exist.")
    if not path.is_dir():
        check_regular_file(path, what="checkpoint")
        return "safetensors"
    try:
        names = set(os.listdir(path))
    except OSError as err:
        raise SubboostError(f"{describe(path)}: cannot read the directory ({err.strerror or err}).") from err
    merge_output = PARAMS_FILE in names or INFO_FILE in names
    orbax = any(marker in names for marker in ORBAX_MARKERS)
    if merge_output and orbax:
        raise SubboostError(
            f"{describe(path)}: holds both an orbax checkpoint and a merge output ({PARAMS_FILE} / {INFO_FILE}); "
            "which one is meant is unclear. Keep one per folder."
        )
    if merge_output:
        return "merge_output"
    if orbax:
        return "orbax"
    for recognise in DIRECTORY_FORMATS:
        form = recognise(path)
        if form is not None:
            return form
    inner = sorted(n for n in names if (path / n).is_dir() and is_checkpoint_dir(path / n))
    hint = f" (it holds the checkpoint folder {inner[0]!r}: pass that path)" if len(inner) == 1 else ""
    raise SubboostError(
        f"{describe(path)}: unknown checkpoint format (expected a .safetensors file, an orbax checkpoint "
        f"directory, a subboost merge output directory or a Hugging Face model directory){hint}."
    )


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``subboost.json`` metadata of a checkpoint (content, architecture, checksums, ...), or None."""
    meta = Path(path) / METADATA_FILE
    if not meta.exists() and not meta.is_symlink():
        return None
    try:
        info = read_json(meta, what="checkpoint metadata")
    except SubboostError as err:
        raise SubboostError(f"{describe(meta)}: unreadable checkpoint metadata ({err}).") from err
    if not isinstance(info, dict):
        raise SubboostError(f"{describe(meta)}: corrupt checkpoint metadata (a JSON {type(info).__name__}, not an object).")
    return info


def merge_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``merge_info.json`` of a streaming merge output directory (an object; `SubboostError` otherwise)."""
    info = read_json(Path(path) / INFO_FILE, what="merge metadata")
    if not isinstance(info, dict):
        raise SubboostError(f"{describe(Path(path) / INFO_FILE)}: corrupt merge metadata (a JSON "
                            f"{type(info).__name__}, not an object).")
    return info


def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds: ``{"content": ..., "architecture": ... or None}``.

    Read from where `checkpoint_format` says the data is: ``subboost.json`` (orbax
    checkpoints), ``merge_info.json`` (streaming merge outputs) or the header of a
    ``.safetensors`` file; a checkpoint that records nothing (written before identities
    existed, or by other code) holds ``"params"`` of an unknown architecture (None, never
    compared).
    """
    path = Path(path)
    form = checkpoint_format(path)
    if form == "merge_output":
        info = merge_info(path) if (path / INFO_FILE).exists() else {}
        content = info.get("content", "params")
        recorded = info.get("architecture")
        arch = None if recorded is None else architecture(recorded if isinstance(recorded, Mapping) else None)
    elif form == "orbax":
        info = checkpoint_info(path)
        content, arch = default_content(info), architecture(info)
    elif form != "safetensors":  # a registered directory format (Hugging Face): model parameters
        content, arch = "params", None
    else:
        header, _ = read_safetensors_header(path)
        recorded = header.get("__metadata__") or {}
        content = recorded.get("content", "params") if isinstance(recorded, dict) else "params"
        arch = None
    if not isinstance(content, str) or content not in CONTENTS:
        raise SubboostError(f"{describe(path)}: records an unknown content {str(content)[:80]!r} "
                            f"(expected one of {tuple(CONTENTS)}).")
    return {"content": content, "architecture": arch}


def require_content(path: str | os.PathLike, expected: str, *, what: str = "checkpoint") -> dict[str, Any]:
    """The identity of ``path``; `SubboostError` unless it holds ``expected``."""
    identity = checkpoint_identity(path)
    if identity["content"] != expected:
        hint = (" (merge_from_checkpoints without alpha writes a task vector: pass alpha=, or add it to a base "
                "with apply_task_vector)") if identity["content"] == "task_vector" else ""
        raise SubboostError(
            f"{what} ({path}) holds {CONTENTS[identity['content']]}, not {CONTENTS[expected]}{hint}."
        )
    return identity


def architecture(info: Mapping[str, Any] | None) -> Any:
    """``(kind, architecture)`` recorded in ``info``; None where nothing is (never compared)."""
    if not info or (info.get("kind") is None and info.get("architecture") is None):
        return None
    return (info.get("kind"), info.get("architecture"))


def check_same_architecture(recorded: Any, base_recorded: Any, *, what: str, base_name: str) -> None:
    """Refuses an expert whose recorded architecture differs from the base's (None: not recorded, not compared)."""
    if recorded is not None and base_recorded is not None and recorded != base_recorded:
        raise SubboostError(f"{what} has architecture {recorded}, but {base_name} has {base_recorded}.")


def specs_of(tree_leaves: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{path: (shape, dtype)}`` of arrays or `jax.ShapeDtypeStruct` values."""
    return {p: (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in tree_leaves.items()}


def check_same_parameters(base: Specs, expert: Specs, *, what: str, base_name: str = "base") -> None:
    """Raises `SubboostError` listing every missing / unexpected parameter and shape or dtype mismatch.

    Args:
      base, expert: ``{path: (shape, dtype)}`` (`specs_of`).
      what: the expert, as named in the message (e.g. ``"expert 1 (path)"``).
      base_name: the base, as named in the message.
    """
    missing = [p for p in base if p not in expert]
    extra = [p for p in expert if p not in base]
    problems = []
    if missing:
        problems.append(f"missing parameters {format_names(missing)}")
    if extra:
        problems.append(f"unexpected parameters {format_names(extra)}")
    for p, (shape, dtype) in base.items():
        if p not in expert:
            continue
        other_shape, other_dtype = expert[p]
        if tuple(other_shape) != tuple(shape):
            problems.append(f"parameter {p!r} has shape {tuple(other_shape)} but {base_name} has {tuple(shape)}")
        elif np.dtype(other_dtype) != np.dtype(dtype):
            problems.append(f"parameter {p!r} has dtype {np.dtype(other_dtype).name} but {base_name} has "
                            f"{np.dtype(dtype).name}")
    if len(problems) > 7:
        problems = [*problems[:7], f"... and {len(problems) - 7} more mismatches"]
    if problems:
        raise SubboostError(f"{what} does not match {base_name}: " + "; ".join(problems)
                            + " (a different architecture or an incomplete checkpoint).")


__all__ = [
    "COMPLETE_MARKER",
    "CONTENTS",
    "FORMAT_VERSION",
    "INFO_FILE",
    "METADATA_FILE",
    "ORBAX_MARKERS",
    "PARAMS_FILE",
    "architecture",
    "array_checksum",
    "check_same_architecture",
    "check_leaf_names",
    "check_same_parameters",
    "checkpoint_format",
    "checkpoint_identity",
    "checkpoint_info",
    "default_content",
    "is_checkpoint_dir",
    "merge_info",
    "require_content",
    "specs_of",
    "verify_checksums",
]
