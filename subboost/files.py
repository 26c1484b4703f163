"""Opening the files a user names, defensively: regular files only, bounded JSON.

Every file a loader opens is checked to be a regular file first (a FIFO, a device or a
socket would block or stream forever), and every JSON document read from disk is
bounded in size and nesting depth, so a hostile or damaged file gives one clear
`SubboostError` naming it instead of a hang, a `RecursionError` or gigabytes of memory.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from subboost.errors import SubboostError

# Largest JSON document read from disk (metadata, markers, safetensors headers: all small).
MAX_JSON_BYTES = 100 * 2**20
# Deepest nesting accepted in such a document (subboost writes at most 4 levels).
MAX_JSON_DEPTH = 64


def describe(path: str | os.PathLike) -> str:
    """A path as shown in messages: printable even when its bytes are not UTF-8."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def check_regular_file(path: str | os.PathLike, *, what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path``; `SubboostError` unless it is a regular file (symbolic links followed)."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise SubboostError(f"{describe(path)}: cannot read the {what} ({err.strerror or err}).") from err
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise SubboostError(f"{describe(path)}: not a {what} ({kind}, not a regular file).")
    return info


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def parse_json(raw: bytes | str, *, source: str, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a nesting limit; `SubboostError` naming ``source`` on any failure.

    ``max_depth=None``: only the parser's own limit (Python's recursion limit, about
    1000 levels) -- for large documents whose structure the caller checks anyway.
    """
    try:
        value = json.loads(raw)
    except RecursionError as err:
        raise SubboostError(f"{source}: JSON nested too deeply (limit {max_depth or 'about 1000'} levels).") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{source}: not valid JSON ({err}).") from err
    if max_depth is not None and json_depth(value) > max_depth:
        raise SubboostError(f"{source}: JSON nested too deeply (limit {max_depth} levels).")
    return value


def read_json(path: str | os.PathLike, *, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file that is a regular file of at most ``max_bytes`` and ``max_depth`` levels."""
    info = check_regular_file(path, what=what)
    if info.st_size > max_bytes:
        raise SubboostError(f"{describe(path)}: {info.st_size} bytes, more than the {max_bytes} accepted for "
                            f"a {what}.")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise SubboostError(f"{describe(path)}: cannot read the {what} ({err.strerror or err}).") from err
    return parse_json(raw, source=f"{describe(path)}: {what}", max_depth=max_depth)


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "check_regular_file", "describe", "json_depth", "parse_json",
           "read_json"]
