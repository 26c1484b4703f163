"""The one output-safety rule every subboost writer follows.

* An output never is, contains or lies inside any of the run's inputs, so no
  input can be overwritten: paths are compared after resolving symbolic links,
  and file identities (device, inode) too, so a bind mount or other alias of an
  input is caught as well (`check_not_an_input`).
* An existing output is replaced only with ``overwrite`` (``--overwrite``), and
  only when it is an empty directory or a directory subboost wrote: its marker
  file (`OUTPUT_KINDS`: ``subboost.json`` of a checkpoint, ``merge_info.json``
  of a streaming merge, ``summary.json`` of an analysis) is a JSON object whose
  subboost field and version say so, and every other entry is one that kind of
  output holds (`written_by_subboost`). An ordinary file, a symbolic link, a
  mount point, or a folder of the user's is never replaced, even with
  ``overwrite``.
* Deleting never crosses a file-system boundary: an old output holding a mount
  point is refused before anything moves, and `remove_tree` refuses to delete a
  tree with a mount point (or another device) inside.
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
import dataclasses
import fnmatch
import json
import os
import shutil
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from subboost.errors import SubboostError
from subboost.files import describe, read_json


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of output subboost writes, recognised by its marker file.

    Attributes:
      marker: the marker file's name inside the output directory.
      field: the field of the marker's JSON object that says subboost wrote it.
      versions: the accepted values of ``field`` (what each version of subboost writes).
      entries: glob patterns of every entry such an output holds (the marker included).
      description: the kind, as named in messages.
      listed: a field of the marker listing further entries the writer wrote (a Hugging Face
        directory's shards and the files copied from its base), or None.
    """

    marker: str
    field: str
    versions: tuple
    entries: tuple[str, ...]
    description: str
    listed: str | None = None

    def recognises(self, folder: Path, names: list[str]) -> bool:
        """Whether ``folder`` (holding ``names``) is this kind of output: marker field and every entry."""
        if self.marker not in names or not (folder / self.marker).is_file():
            return False
        try:
            info = read_json(folder / self.marker, what="marker", max_bytes=64 * 2**20)
        except SubboostError:
            return False
        if not isinstance(info, dict) or info.get(self.field) not in self.versions:
            return False
        written = info.get(self.listed, []) if self.listed else []
        written = set(written) if isinstance(written, list) and all(isinstance(w, str) for w in written) else set()
        return all(name in written or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.entries)
                   for name in names)


# What an orbax PyTree checkpoint directory holds (orbax 0.x, OCDBT layout), plus subboost.json.
ORBAX_ENTRIES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "manifest.ocdbt", "ocdbt.process_*", "d",
                 "array_metadatas", "descriptor", "commit_success.txt")
# The files `subboost analyze` writes into its output folder.
ANALYSIS_FILES: tuple[str, ...] = (
    "gsv_distributions.png", "gsv_distributions.json", "alignment.png", "alignment.json",
    "rank_collapse.png", "rank_collapse.json", "spectra.png", "spectra.json",
    "spectra_boosted.png", "spectra_boosted.json", "summary.json",
)
ANALYSIS_FORMAT = "subboost.analysis/1"  # summary.json's "format"
LORA_FORMAT = "subboost.lora/1"
EXPORT_FORMAT = "subboost.export/1"  # subboost.json's "format" in a `subboost export` directory  # lora_merge.json's "format" (a merged PEFT adapter)

OUTPUT_KINDS: tuple[OutputKind, ...] = (
    OutputKind("subboost.json", "subboost_checkpoint", (1, 2), (*ORBAX_ENTRIES, "subboost.json"),
               "a subboost checkpoint"),
    OutputKind("merge_info.json", "format", ("subboost.streaming/1",),
               ("params.safetensors", "params-*-of-*.safetensors", "params.safetensors.index.json", "merge_info.json",
                "COMPLETE"), "a streaming merge output"),
    OutputKind("merge_info.json", "format", ("subboost.huggingface/1",), ("merge_info.json", "COMPLETE"),
               "a merged Hugging Face directory", listed="files"),
    OutputKind("subboost.json", "format", (EXPORT_FORMAT,), ("config.json", "model.safetensors", "subboost.json"),
               "a Hugging Face export"),
    OutputKind("summary.json", "format", (ANALYSIS_FORMAT,), ANALYSIS_FILES, "a subboost analysis"),
    OutputKind("lora_merge.json", "format", (LORA_FORMAT,),
               ("adapter_config.json", "adapter_model.safetensors", "lora_merge.json"), "a merged LoRA adapter"),
)
# Marker file -> what wrote the directory holding it.
MARKER_FILES: dict[str, str] = {kind.marker: kind.description for kind in OUTPUT_KINDS}


class OutputOverlapError(SubboostError):
    """The output path is, contains or lies inside an input of the same run."""


def _resolved(path: str | os.PathLike) -> Path:
    try:
        return Path(path).expanduser().resolve(strict=False)
    except RuntimeError as err:  # "~nosuchuser", or a symbolic-link loop (Python < 3.13)
        raise SubboostError(f"{describe(path)!r}: cannot resolve the path ({err}).") from err
    except OSError as err:  # a symbolic-link loop (Python >= 3.13)
        raise SubboostError(f"{describe(path)!r}: cannot resolve the path ({err.strerror or err}).") from err


def absolute_path(path: str | os.PathLike, *, name: str = "path") -> Path:
    """``path`` with ``~`` expanded, made absolute; `SubboostError` for an unknown user or a link loop."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError as err:
        raise SubboostError(f"{name} {describe(path)!r}: cannot expand the home directory ({err}).") from err
    _resolved(expanded)  # refuses a symbolic-link loop
    return expanded.absolute()


def mount_points() -> list[Path]:
    """Every mount point of this process's mount namespace (Linux ``/proc/self/mountinfo``; else none)."""
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:  # field 5 is the mount point; space, tab, newline and backslash are octal-escaped
            raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            points.append(Path(os.fsdecode(raw)))
    return points


def mounts_inside(path: str | os.PathLike) -> list[Path]:
    """Mount points at or below ``path`` (a bind mount of the same file system included)."""
    root = _resolved(path)
    points = mount_points()
    found = [point for point in points if point == root or root in point.parents]
    if not points and Path(root).is_dir():  # where mountinfo is missing: a change of device
        with contextlib.suppress(OSError):
            device = os.lstat(root).st_dev
            for folder, dirs, _ in os.walk(root):
                for d in dirs:
                    child = Path(folder) / d
                    with contextlib.suppress(OSError):
                        if os.lstat(child).st_dev != device:
                            found.append(child)
    return found


def written_by_subboost(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an empty directory or an output subboost wrote (`OUTPUT_KINDS`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if not names:
        return True
    return any(kind.recognises(path, names) for kind in OUTPUT_KINDS)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, name: str = "--out",
                       replaced: Iterable[str | os.PathLike] = ()) -> None:
    """Raises `OutputOverlapError` if ``out`` is, contains or lies inside any input.

    Compared twice: as paths (symbolic links resolved), and as file identities
    (device, inode), which also catches a bind mount or hard-linked alias: ``out`` and
    its existing parents against every input, and every file and folder under the
    ``replaced`` paths (what the write would delete) against every input.
    """
    target = _resolved(out)
    inputs = [item for item in inputs if item is not None]
    identities: dict[tuple[int, int], str] = {}
    for item in inputs:
        source = _resolved(item)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            identity = _identity(source)
            if identity is not None:
                identities.setdefault(identity, str(item))
            continue
        raise OutputOverlapError(
            f"{name} {describe(out)!r} {relation} the input {describe(item)!r}; an input is never overwritten. "
            "Choose another output path."
        )
    if not identities:
        return

    def refuse(relation: str, item: str) -> None:
        raise OutputOverlapError(
            f"{name} {describe(out)!r} {relation} the input {describe(item)!r} (the same file under another path: "
            "a bind mount, hard link or alias); an input is never overwritten. Choose another output path."
        )

    identity = _identity(target)
    if identity in identities:
        refuse("is", identities[identity])
    for parent in target.parents:
        identity = _identity(parent)
        if identity in identities:
            refuse("lies inside", identities[identity])
    for root in replaced:
        root = Path(root)
        if root.is_symlink() or not root.exists():
            continue
        identity = _identity(root)
        if identity in identities:
            refuse("would replace", identities[identity])
        for folder, dirs, files in os.walk(root):
            for entry in (*dirs, *files):
                identity = _identity(Path(folder) / entry)
                if identity in identities:
                    refuse("contains", identities[identity])


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    name: str = "destination",
) -> Path:
    """Applies the rule (see the module docstring) to ``out``; returns its absolute path.

    ``name`` names ``out`` in messages; a command-line flag or argument (``"--out"``,
    ``"DST"``) makes them say ``--overwrite`` rather than ``overwrite=True``.

    Raises:
      OutputOverlapError: ``out`` is, contains or lies inside an input.
      FileExistsError: ``out`` exists and ``overwrite`` is False, or it exists
        and is not a directory subboost wrote, or it holds a mount point.
    """
    path = absolute_path(out, name=name)
    inputs = list(inputs)
    check_not_an_input(out, inputs, name=name)
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise SubboostError(f"{name} {describe(out)!r}: the path is not valid UTF-8; choose another.") from None
    if not path.exists() and not path.is_symlink():
        blocker = next((parent for parent in path.parents if parent.exists() or parent.is_symlink()), None)
        if blocker is not None and not blocker.is_dir():
            raise SubboostError(f"{name} {describe(out)!r}: {describe(blocker)!r} is not a directory, so nothing "
                                "can be written under it.")
        return path
    flag = "--overwrite" if name.startswith("-") or name.isupper() else "overwrite=True"  # "--out", "DST": the CLI
    if not overwrite:
        raise FileExistsError(f"{name} {describe(out)!r} already exists; pass {flag} to replace it.")
    if path.is_symlink():
        problem = "is a symbolic link"
    elif not path.is_dir():
        problem = "is a file, not a directory subboost wrote"
    elif mounts_inside(path):
        problem = f"holds a mount point ({describe(mounts_inside(path)[0])})"
    elif not written_by_subboost(path):
        problem = ("is not a checkpoint or other output written by subboost (no subboost marker file "
                   f"({', '.join(MARKER_FILES)}) recording it, or entries subboost does not write)")
    else:
        check_not_an_input(out, inputs, name=name, replaced=[path])
        return path
    raise FileExistsError(
        f"{name} {describe(out)!r} {problem}; refusing to replace it even with {flag}. "
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
    if pid <= 0:  # unknown owner: treat as alive (never delete what we cannot attribute)
        return True
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
            owner = read_json(partial / OWNER_FILE, what="staging owner", max_bytes=4096)
            pid = int(owner.get("pid", -1))
        except (SubboostError, AttributeError, TypeError, ValueError, OverflowError):
            continue
        if owner.get("host") == socket.gethostname() and not _pid_alive(pid) and not mounts_inside(partial):
            shutil.rmtree(partial, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _wait_for_threads(before: set[threading.Thread], timeout: float = 60.0) -> None:
    """Joins threads started since ``before`` (orbax's writers), so none writes after cleanup.

    tqdm's monitor thread (started by the first progress bar) writes nothing and lives
    until the process ends: waiting for it would only add ``timeout`` to every failure.
    """
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        if type(thread).__name__ == "TMonitor" and thread.daemon:
            continue
        if thread is not threading.current_thread() and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))


def remove_tree(path: str | os.PathLike) -> None:
    """``rm -r path`` that never crosses a file-system boundary.

    Refuses (`SubboostError`, nothing deleted) a tree holding a mount point, a bind
    mount of the same file system included, or a folder on another device.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    mounts = mounts_inside(path)
    if mounts:
        raise SubboostError(f"{describe(path)!r} holds a mount point ({describe(mounts[0])}); not deleting it.")
    shutil.rmtree(path)


def _remove_tree(path: Path) -> None:
    """`remove_tree` that retries: a writer finishing late can recreate files while we delete."""
    if path.exists() and mounts_inside(path):
        return  # never delete across a mount; check_output refused such an output before it moved
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
    except BaseException as err:
        try:
            _wait_for_threads(threads)
        finally:
            _remove_tree(staging)
            remove_created(created)
        if isinstance(err, OSError) and not err.filename and err.errno is not None:
            # e.g. a bare "[Errno 28] No space left on device" from a writer: say where
            raise OSError(err.errno, f"{err.strerror or err} while writing {describe(out)}") from err
        raise
    _remove_tree(staging)


def write_atomically(dst: str | os.PathLike, build: Callable[[Path], None], *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Calls ``build(path)`` to create ``path`` (`staged_output`), then renames it to ``dst``; returns ``dst``."""
    with staged_output(dst, overwrite=overwrite, inputs=inputs, create=False) as built:
        build(built)
    return Path(dst).expanduser().absolute()


__all__ = [
    "ANALYSIS_FILES",
    "ANALYSIS_FORMAT",
    "MARKER_FILES",
    "OUTPUT_KINDS",
    "OutputKind",
    "OutputOverlapError",
    "absolute_path",
    "check_not_an_input",
    "check_output",
    "make_parents",
    "mount_points",
    "mounts_inside",
    "remove_created",
    "remove_tree",
    "staged_output",
    "write_atomically",
    "written_by_subboost",
]
