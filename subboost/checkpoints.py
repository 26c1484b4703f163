"""Parameter checkpoints on disk: orbax save / restore, and loading many experts at once.

A subboost checkpoint is an orbax PyTree checkpoint directory holding a nested dict of
arrays, plus ``subboost.json`` inside it, written by every save:

* ``content``: what the arrays are -- ``"params"`` (model parameters), ``"task_vector"``
  (a difference to a base) or ``"head"`` (a classification head);
* ``kind`` / ``architecture``: the model, where known (converters, merges of converted models);
* ``checksums``: a CRC-32 of every array's bytes, verified on every load, so corrupt data
  is refused with the file named instead of loading as huge or NaN weights;
* provenance (source files and hashes, merge settings).

Checkpoints written before ``content`` / ``checksums`` existed (and orbax directories
written by other code) still load: a missing ``content`` means ``"params"`` (or ``"head"``
for a converter's ``classification_head``), missing checksums are not verified, and a
missing architecture is not compared. Writes are atomic: everything is built in a hidden
staging directory next to the destination and renamed into place only when complete, so a
failed or interrupted save leaves nothing at the destination (`write_atomically`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.task_vectors import SubboostError
from subboost.tree import PyTree, leaves_with_paths

METADATA_FILE = "subboost.json"
FORMAT_VERSION = 2  # 2: content and checksums recorded
CONTENTS: dict[str, str] = {"params": "model parameters", "task_vector": "a task vector", "head": "a classification head"}
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an orbax checkpoint directory."""
    path = Path(path)
    return path.is_dir() and any((path / marker).exists() for marker in _ORBAX_MARKERS)


def _check_destination(dst: Path, overwrite: bool, inputs=()) -> None:
    from subboost.outputs import check_output

    check_output(dst, inputs=inputs, overwrite=overwrite)


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


def write_atomically(dst: str | os.PathLike, build, *, overwrite: bool = False, inputs=()) -> Path:
    """Calls ``build(staging_path)`` to create ``staging_path``, then renames it to ``dst``.

    ``staging_path`` lies in a hidden sibling directory of ``dst`` (same filesystem, so the
    rename is atomic); on any error, KeyboardInterrupt included, the threads the build
    started are waited for, then the staging directory (and any parent directory created
    for ``dst``) is removed, and ``dst`` is untouched. ``dst`` must pass
    `subboost.outputs.check_output` against ``inputs``.
    """
    from subboost.outputs import make_parents, remove_created

    dst = Path(dst).absolute()
    _check_destination(dst, overwrite, inputs)
    created = make_parents(dst)
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    threads = set(threading.enumerate())
    try:
        staging.mkdir()
        built = staging / "out"
        build(built)
        _check_destination(dst, overwrite, inputs)  # again: something may have appeared meanwhile
        if dst.exists() or dst.is_symlink():
            os.replace(dst, staging / "replaced")
        os.replace(built, dst)
    except BaseException:
        try:
            _wait_for_threads(threads)
        finally:
            _remove_tree(staging)
            remove_created(created)
        raise
    _remove_tree(staging)
    return dst


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
            f"(not recorded: {unlisted[:5]}, recorded but absent: {missing[:5]}); the checkpoint is damaged."
        )
    for name, array in arrays.items():
        found = array_checksum(np.asarray(array))
        if found != checksums[name]:
            raise SubboostError(
                f"{source}: parameter {name!r} fails its checksum ({found}, recorded {checksums[name]}): "
                "the checkpoint data is corrupt. Re-create or re-copy it."
            )


def _to_host(tree: PyTree) -> PyTree:
    def convert(path, leaf):
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise SubboostError(f"save_params: parameter {name!r} is not an array ({type(leaf).__name__}).")
        array = np.asarray(jax.device_get(leaf))
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
            if not np.isfinite(array.astype(np.float32)).all():
                raise SubboostError(f"save_params: parameter {name!r} contains NaN or infinite values; "
                                    "refusing to write a non-finite checkpoint.")
        return array

    return jax.tree_util.tree_map_with_path(convert, tree)


def _default_content(metadata: Mapping[str, Any] | None) -> str:
    if metadata and metadata.get("content") is not None:
        return metadata["content"]
    return "head" if metadata and metadata.get("kind") == "classification_head" else "params"


def save_params(
    params: PyTree,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    content: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Saves a parameter pytree (nested dicts of arrays) as an orbax checkpoint directory.

    Args:
      params: the tree; arrays anywhere (sharded device arrays are gathered to the host).
        Every floating-point leaf must be finite.
      path: destination directory; must not exist unless ``overwrite``.
      overwrite: replace an existing checkpoint at ``path`` (only a directory subboost
        wrote, see `subboost.outputs`).
      metadata: JSON-serialisable dict written to ``path/subboost.json``, next to
        ``content``, ``checksums`` and ``subboost_checkpoint`` (which this function sets).
      content: what the tree is: ``"params"``, ``"task_vector"`` or ``"head"``
        (default: ``metadata["content"]``, else ``"head"`` for a converter's
        classification head, else ``"params"``).
      inputs: paths this output must not be, contain or lie inside (the run's inputs).

    Returns:
      The absolute destination path.
    """
    import orbax.checkpoint as ocp

    content = content if content is not None else _default_content(metadata)
    if content not in CONTENTS:
        raise SubboostError(f"save_params: content must be one of {tuple(CONTENTS)}, got {content!r}.")
    if not leaves_with_paths(params):
        raise SubboostError("save_params: the parameter tree is empty.")
    _check_destination(Path(path).absolute(), overwrite, inputs)  # before the (slow) device-to-host copy
    host = _to_host(params)
    meta = {k: v for k, v in (metadata or {}).items() if k not in ("checksums", "content", "subboost_checkpoint")}
    meta.update(subboost_checkpoint=FORMAT_VERSION, content=content,
                checksums={name: array_checksum(x) for name, x in leaves_with_paths(host)})
    meta_text = json.dumps(meta, indent=2, sort_keys=True, default=str)

    def build(target: Path) -> None:
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            checkpointer.save(target, args=ocp.args.PyTreeSave(host))
        finally:
            checkpointer.close() if hasattr(checkpointer, "close") else None
        (target / METADATA_FILE).write_text(meta_text + "\n")

    return write_atomically(path, build, overwrite=overwrite, inputs=inputs)


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``subboost.json`` metadata of a checkpoint (content, architecture, checksums, ...), or None."""
    meta = Path(path) / METADATA_FILE
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{meta}: unreadable checkpoint metadata ({err}).") from err
    if not isinstance(info, dict):
        raise SubboostError(f"{meta}: corrupt checkpoint metadata (a JSON {type(info).__name__}, not an object).")
    return info


def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds: ``{"content": ..., "architecture": ... or None}``.

    Read from ``subboost.json`` (orbax checkpoints), ``merge_info.json`` (streaming merge
    outputs) or the header of a ``.safetensors`` file; a checkpoint that records nothing
    (written before identities existed, or by other code) holds ``"params"`` of an unknown
    architecture (None, never compared).
    """
    from subboost.streaming import INFO_FILE, read_safetensors_header

    path = Path(path)
    if path.is_dir() and (path / INFO_FILE).is_file():
        try:
            info = json.loads((path / INFO_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SubboostError(f"{path / INFO_FILE}: unreadable merge metadata ({err}).") from err
        content = info.get("content", "params") if isinstance(info, dict) else "params"
        recorded = info.get("architecture") if isinstance(info, dict) else None
        architecture = None if recorded is None else _architecture(recorded)
    elif path.is_dir():
        info = checkpoint_info(path)
        content, architecture = _default_content(info), _architecture(info)
    elif path.is_file() and path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        recorded = header.get("__metadata__") or {}
        content = recorded.get("content", "params") if isinstance(recorded, dict) else "params"
        architecture = None
    else:
        content, architecture = "params", None
    if content not in CONTENTS:
        raise SubboostError(f"{path}: records an unknown content {content!r} (expected one of {tuple(CONTENTS)}).")
    return {"content": content, "architecture": architecture}


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


def short_error(err: BaseException, limit: int = 300) -> str:
    """An exception's first line, without tensorstore's spec dump, at most ``limit`` characters."""
    text = str(err).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LOOP_NOISE = ("asyncio/base_events.py", "self._check_closed()", "raise RuntimeError('Event loop is closed')",
               "RuntimeError: Event loop is closed")


@contextlib.contextmanager
def quiet_event_loop_noise(grace: float = 0.5) -> Iterator[None]:
    """Drops the "Event loop is closed" tracebacks orbax's reader threads print after a failed restore.

    When tensorstore reports damaged data, orbax closes its event loop while other reads
    are still in flight; each then prints a traceback from its own thread. Output to
    stderr (the file descriptor and ``sys.stderr``) is collected while the block runs and,
    on an error, for ``grace`` seconds more; everything but those tracebacks is then
    written back, so a damaged checkpoint yields one clean error line.
    """
    import io
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to keep clean
        yield
        return
    saved_stream = sys.stderr
    capture = tempfile.TemporaryFile(mode="w+b")
    buffer = io.StringIO()
    os.dup2(capture.fileno(), 2)
    sys.stderr = buffer
    try:
        yield
    except BaseException:
        time.sleep(grace)  # the in-flight reads finish and print now, into the capture
        raise
    finally:
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        capture.seek(0)
        text = capture.read().decode(errors="replace") + buffer.getvalue()
        capture.close()
        lines = text.splitlines(keepends=True)
        kept = []
        for i, line in enumerate(lines):
            if any(marker in line for marker in _LOOP_NOISE):
                continue
            if line.startswith("Traceback (most recent call last):") and i + 1 < len(lines) and \
                    _LOOP_NOISE[0] in lines[i + 1]:
                continue
            kept.append(line)
        if kept:
            saved_stream.write("".join(kept))
            saved_stream.flush()


def _restore_orbax(path: Path) -> PyTree:
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with quiet_event_loop_noise():
            metadata = checkpointer.metadata(path.absolute())
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            # Restore as host numpy: works on any machine, whatever devices / sharding it was saved from.
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as err:  # orbax / tensorstore raise many types for a damaged directory
        raise SubboostError(
            f"{path}: cannot restore the orbax checkpoint ({type(err).__name__}: {short_error(err)}); "
            "the checkpoint is damaged or incomplete."
        ) from err
    finally:
        if hasattr(checkpointer, "close"):
            checkpointer.close()


def load_params(path: str | os.PathLike, *, as_numpy: bool = False, content: str | None = None) -> PyTree:
    """Restores a parameter pytree saved by `save_params` (or a converter) on the host.

    Also reads the other formats subboost writes: a streaming merge output directory
    (``params.safetensors``) or a ``.safetensors`` file with ``"a/b/c"`` keys. Recorded
    checksums are verified (`verify_checksums`).

    Args:
      path: the checkpoint.
      as_numpy: return numpy arrays instead of jax arrays on the default device.
      content: if given (``"params"``, ``"task_vector"``, ``"head"``), refuse a
        checkpoint recording other contents (`checkpoint_identity`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    if content is not None:
        require_content(path, content)
    if is_checkpoint_dir(path):
        tree = _restore_orbax(path)
        info = checkpoint_info(path)
        verify_checksums(path, dict(leaves_with_paths(tree)), None if info is None else info.get("checksums"))
    else:
        from subboost.streaming import read_params

        tree = read_params(path)
    if as_numpy:
        return jax.tree_util.tree_map(np.asarray, tree)
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _architecture(info: Mapping[str, Any] | None) -> Any:
    """``(kind, architecture)`` recorded in ``info``; None where nothing is (never compared)."""
    if not info or (info.get("kind") is None and info.get("architecture") is None):
        return None
    return (info.get("kind"), info.get("architecture"))


def check_expert_against_base(base: PyTree, expert: PyTree, *, what: str, base_name: str = "base") -> None:
    """Raises `SubboostError` listing every missing / unexpected parameter and every shape mismatch."""
    base_specs = {p: (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in leaves_with_paths(base)}
    expert_specs = {p: (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in leaves_with_paths(expert)}
    missing = [p for p in base_specs if p not in expert_specs]
    extra = [p for p in expert_specs if p not in base_specs]
    problems = []
    if missing:
        problems.append(f"missing parameters {missing}")
    if extra:
        problems.append(f"unexpected parameters {extra}")
    for p in base_specs:
        if p in expert_specs and expert_specs[p][0] != base_specs[p][0]:
            problems.append(f"parameter {p!r} has shape {expert_specs[p][0]} but {base_name} has {base_specs[p][0]}")
        elif p in expert_specs and expert_specs[p][1] != base_specs[p][1]:
            problems.append(
                f"parameter {p!r} has dtype {expert_specs[p][1].name} but {base_name} has {base_specs[p][1].name}"
            )
    if problems:
        raise SubboostError(f"{what} does not match {base_name}: " + "; ".join(problems) + ".")


def load_experts(
    base: str | os.PathLike | PyTree,
    experts: Sequence[str | os.PathLike],
    *,
    check_architecture: bool = True,
) -> PyTree:
    """Loads expert checkpoints and returns their stacked task vectors against ``base``.

    ``tau[t] = theta_t - theta_0`` for every expert ``t``, leaves stacked on a new leading
    axis of size ``T = len(experts)`` (see `subboost.task_vectors`).

    Args:
      base: the pretrained checkpoint's path, or its parameters already loaded.
      experts: paths of the fine-tuned checkpoints.
      check_architecture: also compare the architectures recorded by the converters
        (``subboost.json``) where both checkpoints have one.

    Raises:
      SubboostError: a checkpoint holds something other than model parameters (a task
        vector, a head), an expert has a different architecture, missing or extra
        parameters (all listed), a parameter of another shape or dtype, or non-finite
        values -- each naming the file.
    """
    return load_base_and_experts(base, experts, check_architecture=check_architecture)[1]


def load_base_and_experts(
    base: str | os.PathLike | PyTree,
    experts: Sequence[str | os.PathLike],
    *,
    check_architecture: bool = True,
    role: str = "expert",
) -> tuple[PyTree, PyTree]:
    """``(base parameters, stacked task vectors)``: `load_experts`, also returning the base.

    ``role`` names the checkpoints in messages (``"expert 1 (path)"``; another role,
    e.g. ``"the merged checkpoint"``, is used as is with the path).
    """
    from subboost.task_vectors import check_finite, check_floating, task_vectors

    experts = [Path(p) for p in experts]
    if not experts:
        raise SubboostError("load_experts needs at least one expert checkpoint; the list is empty.")
    if isinstance(base, (str, os.PathLike)):
        base_name = f"base ({base})"
        base_arch = require_content(base, "params", what="the base")["architecture"] if Path(base).exists() else None
        base_params = load_params(base)
    else:
        base_name, base_arch, base_params = "base", None, base
    check_floating(base_params, what=base_name)
    check_finite(base_params, what=base_name)
    loaded = []
    for t, path in enumerate(experts):
        name = f"{role} {t}" if role == "expert" else role
        what = f"{name} ({path})"
        if not path.exists():
            raise FileNotFoundError(f"{what} does not exist.")
        arch = require_content(path, "params", what=name)["architecture"]
        if check_architecture and base_arch is not None and arch is not None and arch != base_arch:
            raise SubboostError(f"{what} has architecture {arch}, but {base_name} has {base_arch}.")
        params = load_params(path)
        check_expert_against_base(base_params, params, what=what, base_name=base_name)
        check_finite(params, what=what)
        loaded.append(params)
    return base_params, task_vectors(base_params, loaded, validate=False)
