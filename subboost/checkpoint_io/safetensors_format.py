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


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file, checked against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SubboostError(f"{path}: not a safetensors file (shorter than 8 bytes).")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SubboostError(f"{path}: not a safetensors file (header length {header_len} is invalid).")
            raw = f.read(header_len)
    except OSError as err:
        raise SubboostError(f"{path}: cannot read the file ({err}).") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{path}: not a safetensors file (corrupted header: {err}).") from err
    if not isinstance(header, dict):
        raise SubboostError(f"{path}: not a safetensors file (header is not a JSON object).")
    data_start = 8 + header_len
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SubboostError(f"{path}: parameter {name!r} has a malformed header entry {entry!r}.") from err
        if any(d < 0 for d in shape):
            raise SubboostError(f"{path}: parameter {name!r} has a negative dimension in its shape {list(shape)}.")
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SubboostError(f"{path}: parameter {name!r}: byte range {begin}..{end} does not fit shape {shape}.")
        if end > data_size:
            raise SubboostError(
                f"{path}: parameter {name!r} ends at byte {end} of the data, but the file holds only "
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
