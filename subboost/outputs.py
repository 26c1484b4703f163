"""The one output-safety rule every subboost writer follows.

* An output never is, contains or lies inside any of the run's inputs (paths
  compared after resolving symbolic links), so no input can be overwritten.
* An existing output is replaced only with ``overwrite`` (``--overwrite``), and
  only when it is a directory subboost wrote, recognised by its marker file
  (`MARKER_FILES`: ``subboost.json`` of a checkpoint, ``merge_info.json`` of a
  streaming merge, ``summary.json`` of an analysis), or an empty directory.
  An ordinary file, a symbolic link, or a folder of the user's is never
  replaced, even with ``overwrite``.
* Directories created for an output that then fails are removed again
  (`make_parents` / `remove_created`).

Writers call `check_output` before computing anything, and again just before
the final rename (something may have appeared meanwhile).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from subboost.task_vectors import SubboostError

# Marker file -> what wrote the directory holding it.
MARKER_FILES: dict[str, str] = {
    "subboost.json": "a subboost checkpoint",
    "merge_info.json": "a streaming merge output",
    "summary.json": "a subboost analysis",
}


class OutputOverlapError(SubboostError):
    """The output path is, contains or lies inside an input of the same run."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def written_by_subboost(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding one of `MARKER_FILES` (or is empty)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        if not any(path.iterdir()):
            return True
    except OSError:
        return False
    return any((path / marker).is_file() for marker in MARKER_FILES)


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, name: str = "--out") -> None:
    """Raises `OutputOverlapError` if ``out`` is, contains or lies inside any input."""
    target = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        source = _resolved(item)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise OutputOverlapError(
            f"{name} {str(out)!r} {relation} the input {str(item)!r}; an input is never overwritten. "
            "Choose another output path."
        )


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    name: str = "destination",
) -> Path:
    """Applies the rule (see the module docstring) to ``out``; returns its absolute path.

    Raises:
      OutputOverlapError: ``out`` is, contains or lies inside an input.
      FileExistsError: ``out`` exists and ``overwrite`` is False, or it exists
        and is not a directory subboost wrote.
    """
    check_not_an_input(out, inputs, name=name)
    path = Path(out).expanduser().absolute()
    if not path.exists() and not path.is_symlink():
        return path
    if not overwrite:
        raise FileExistsError(f"{name} {str(out)!r} already exists; pass overwrite=True (--overwrite) to replace it.")
    if path.is_symlink():
        problem = "is a symbolic link"
    elif not path.is_dir():
        problem = "is a file, not a directory subboost wrote"
    elif not written_by_subboost(path):
        problem = (f"is not a checkpoint or other output written by subboost (it has none of "
                   f"{', '.join(MARKER_FILES)})")
    else:
        return path
    raise FileExistsError(
        f"{name} {str(out)!r} {problem}; refusing to replace it even with overwrite. "
        "Remove it yourself or choose another path."
    )


def make_parents(path: Path) -> list[Path]:
    """Creates the missing parent directories of ``path``; returns them, deepest first."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def remove_created(created: Iterable[Path]) -> None:
    """Removes directories `make_parents` created, where they are still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


__all__ = [
    "MARKER_FILES",
    "OutputOverlapError",
    "check_not_an_input",
    "check_output",
    "make_parents",
    "remove_created",
    "written_by_subboost",
]
