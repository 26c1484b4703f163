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
* Outputs are written atomically (`staged_output`, `write_atomically`): built in
  a hidden sibling directory ``.{name}.partial-*`` and renamed into place only
  when complete, so a failed or interrupted run leaves nothing at the output.

Writers call `check_output` before computing anything, and again just before
the final rename (something may have appeared meanwhile).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from subboost.task_vectors import SubboostError

# Marker file -> what wrote the directory holding it.
MARKER_FILES: dict[str, str] = {
    "subboost.json": "a subboost checkpoint",
    "merge_info.json": "a streaming merge output",
    "summary.json": "a subboost analysis",
    "lora_merge.json": "a merged LoRA adapter",
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


# Inside a staging directory: which process builds it (a dead one's is removed by the next run).
OWNER_FILE = "owner.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(out: Path) -> None:
    """Deletes staging directories of earlier runs for ``out`` whose process is gone."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            owner = json.loads((partial / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
            shutil.rmtree(partial, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _wait_for_threads(before: set[threading.Thread], timeout: float = 60.0) -> None:
    """Joins threads started since ``before`` (orbax's writers), so none writes after cleanup."""
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        if thread is not threading.current_thread() and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))


def _remove_tree(path: Path) -> None:
    """``rm -r`` that retries: a writer finishing late can recreate files while we delete."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    name: str = "destination",
    create: bool = True,
) -> Iterator[Path]:
    """Yields the path to build; it becomes ``out`` only if the block completes.

    The path lies in a hidden sibling directory of ``out`` (same filesystem, so the
    rename is atomic) recording its owner process; a dead run's is removed by the
    next. On any error, KeyboardInterrupt included, the threads started meanwhile
    are waited for, the staging directory and any parent created for ``out`` are
    removed, and ``out`` is untouched. ``out`` must pass `check_output` against
    ``inputs``, before and again just before the rename.

    Args:
      create: create the yielded directory (False: the block creates it, e.g. orbax).
    """
    inputs = [p for p in inputs if isinstance(p, (str, os.PathLike))]
    out = check_output(out, inputs=inputs, overwrite=overwrite, name=name)
    created = make_parents(out)
    _remove_dead_partials(out)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    threads = set(threading.enumerate())
    try:
        staging.mkdir()
        (staging / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        built = staging / "out"
        if create:
            built.mkdir()
        yield built
        _fsync_dir(built)
        check_output(out, inputs=inputs, overwrite=overwrite, name=name)  # something may have appeared meanwhile
        if out.exists() or out.is_symlink():
            os.replace(out, staging / "replaced")
        os.replace(built, out)
        _fsync_dir(out.parent)
    except BaseException:
        try:
            _wait_for_threads(threads)
        finally:
            _remove_tree(staging)
            remove_created(created)
        raise
    _remove_tree(staging)


def write_atomically(dst: str | os.PathLike, build: Callable[[Path], None], *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Calls ``build(path)`` to create ``path`` (`staged_output`), then renames it to ``dst``; returns ``dst``."""
    with staged_output(dst, overwrite=overwrite, inputs=inputs, create=False) as built:
        build(built)
    return Path(dst).expanduser().absolute()


__all__ = [
    "MARKER_FILES",
    "OutputOverlapError",
    "check_not_an_input",
    "check_output",
    "make_parents",
    "remove_created",
    "staged_output",
    "write_atomically",
    "written_by_subboost",
]
