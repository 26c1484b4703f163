"""The safetensors format: a little-endian u64 header length, a JSON header of
``name -> {dtype, shape, data_offsets}`` (plus optional ``__metadata__``), then the raw data.

Read with positioned reads (no memory map, so untouched tensors cost nothing) and written
tensor by tensor (`SafetensorsWriter`: the header first, since shapes are known up front).
Keys are parameter paths ``"a/b/c"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from subboost.errors import SubboostError
from subboost.files import check_regular_file, describe, parse_json
from subboost.tree import PyTree, leaves_with_paths

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20


def _safetensors_dtype_name(dtype: Any, what: str) -> str:
    name = _SAFETENSORS_NAMES.get(np.dtype(dtype))
    if name is None:
        raise SubboostError(f"{what}: dtype {np.dtype(dtype).name} cannot be stored in safetensors.")
    return name


def _entry_layout(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, checked against the format's rules."""
    shown = describe(path)
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SubboostError(f"{shown}: parameter {name[:200]!r} has a malformed header entry "
                            "(expected exactly dtype, shape and data_offsets).")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise SubboostError(f"{shown}: parameter {name[:200]!r} has an unknown dtype {str(dtype)[:40]!r} "
                            f"(known: {', '.join(SAFETENSORS_DTYPES)}).")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise SubboostError(f"{shown}: parameter {name[:200]!r}: shape {str(shape)[:80]} is not a list of integers.")
    if any(d < 0 for d in shape):
        raise SubboostError(f"{shown}: parameter {name[:200]!r} has a negative dimension in its shape {shape}.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(v) is int for v in offsets):
        raise SubboostError(f"{shown}: parameter {name[:200]!r}: data_offsets {str(offsets)[:80]} is not two integers.")
    begin, end = offsets
    # Python integers: a huge shape cannot overflow, it just fails to match the byte range.
    if begin < 0 or end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        raise SubboostError(f"{shown}: parameter {name[:200]!r}: byte range {begin}..{end} does not fit shape "
                            f"{shape[:8]}{'...' if len(shape) > 8 else ''}.")
    return begin, end


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file, checked against the format's rules.

    Checked before anything is allocated for the data: a regular file; a header length of
    at most 100 MiB inside the file; a JSON object of bounded depth; ``__metadata__`` a
    string-to-string map; every entry a known dtype, a shape of non-negative integers and
    a byte range of exactly that size; the ranges together tile the data without gap or
    overlap, and end where the file ends.
    """
    path = Path(path)
    shown = describe(path)
    size = check_regular_file(path, what="safetensors file").st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SubboostError(f"{shown}: not a safetensors file (shorter than 8 bytes).")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SubboostError(f"{shown}: not a safetensors file (header length {header_len} is invalid).")
            raw = f.read(header_len)
    except OSError as err:
        raise SubboostError(f"{shown}: cannot read the file ({err.strerror or err}).") from err
    try:
        # The parser's own depth limit only: every entry's structure is checked below, one level deep.
        header = parse_json(raw, source=f"{shown}: safetensors header", max_depth=None)
    except SubboostError as err:
        raise SubboostError(f"{err} Not a safetensors file, or a corrupted one.") from err
    if not isinstance(header, dict):
        raise SubboostError(f"{shown}: not a safetensors file (header is not a JSON object).")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SubboostError(f"{shown}: __metadata__ is not a map of strings to strings, as the format requires.")
    data_start = 8 + header_len
    data_size = size - data_start
    ranges = sorted((_entry_layout(path, name, entry), name) for name, entry in header.items()
                    if name != "__metadata__")
    position = 0
    for (begin, end), name in ranges:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise SubboostError(f"{shown}: parameter {name[:200]!r} (bytes {begin}..{end}) {problem}; "
                                "the header is corrupt.")
        position = end
    if position > data_size:
        raise SubboostError(
            f"{shown}: the tensors end at byte {position} of the data, but the file holds only "
            f"{data_size} data bytes (truncated file?)."
        )
    return header, data_start


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor (header first: shapes are known up front).

    Tensors are laid out contiguously in the order of ``specs``; `write` may
    be called in any order, `close` checks that every tensor was written.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], Any]],
                 *, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _safetensors_dtype_name(dtype, f"{self.path}: parameter {name!r}"),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout[name] = (offset, tuple(shape), dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, array: Any) -> None:
        offset, shape, dtype = self._layout[name]
        array = np.asarray(array)
        if array.shape != shape or array.dtype != dtype:
            raise SubboostError(
                f"{self.path}: parameter {name!r} expected shape {shape} dtype {dtype.name}, "
                f"got shape {array.shape} dtype {array.dtype.name}."
            )
        self._file.seek(self._data_start + offset)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._written.add(name)

    def close(self) -> None:
        missing = [name for name in self._layout if name not in self._written]
        if missing:
            self._file.close()
            raise SubboostError(f"{self.path}: parameters never written: {missing[:5]}.")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def save_safetensors(tree: PyTree, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Writes a parameter pytree to one safetensors file with ``"a/b/c"`` keys."""
    flat = [(p, np.asarray(x)) for p, x in leaves_with_paths(tree)]
    writer = SafetensorsWriter(path, {p: (x.shape, x.dtype) for p, x in flat}, metadata=metadata)
    try:
        for p, x in flat:
            writer.write(p, x)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return Path(path)


__all__ = ["SAFETENSORS_DTYPES", "SafetensorsWriter", "read_safetensors_header", "save_safetensors"]
