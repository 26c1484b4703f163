"""Parameter checkpoints on disk: orbax save / restore, and loading many experts at once.

A subboost checkpoint is an orbax PyTree checkpoint directory holding a nested dict of
arrays, plus ``subboost.json`` inside it (architecture, source file hashes; written by the
converters in `subboost.convert`, optional for `save_params`). Writes are atomic: everything
is built in a hidden staging directory next to the destination and renamed into place only
when complete, so a failed or interrupted save leaves nothing at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.task_vectors import SubboostError
from subboost.tree import PyTree, leaves_with_paths

METADATA_FILE = "subboost.json"
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an orbax checkpoint directory."""
    path = Path(path)
    return path.is_dir() and any((path / marker).exists() for marker in _ORBAX_MARKERS)


def _check_destination(dst: Path, overwrite: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"destination {str(dst)!r} already exists; pass overwrite=True (--overwrite) to replace it.")
    if dst.is_dir() and not dst.is_symlink() and any(dst.iterdir()) and not is_checkpoint_dir(dst):
        # --overwrite replaces a checkpoint, never an arbitrary non-empty folder (a typo could cost a home dir).
        raise FileExistsError(
            f"destination {str(dst)!r} is a non-empty directory that is not a checkpoint; "
            "refusing to replace it even with overwrite. Remove it yourself or choose another path."
        )


def write_atomically(dst: str | os.PathLike, build, *, overwrite: bool = False) -> Path:
    """Calls ``build(staging_path)`` to create ``staging_path``, then renames it to ``dst``.

    ``staging_path`` lies in a hidden sibling directory of ``dst`` (same filesystem, so the
    rename is atomic); on any error the staging directory is removed and ``dst`` is untouched.
    """
    dst = Path(dst).absolute()
    _check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        built = staging / "out"
        build(built)
        _check_destination(dst, overwrite)  # again: something may have appeared meanwhile
        old = None
        if dst.exists() or dst.is_symlink():
            old = staging / "replaced"
            os.replace(dst, old)
        os.replace(built, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return dst


def _to_host(tree: PyTree) -> PyTree:
    def convert(path, leaf):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise SubboostError(
                f"save_params: parameter {'/'.join(str(getattr(k, 'key', k)) for k in path)!r} is not an array "
                f"({type(leaf).__name__})."
            )
        return np.asarray(jax.device_get(leaf))

    return jax.tree_util.tree_map_with_path(convert, tree)


def save_params(
    params: PyTree,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Saves a parameter pytree (nested dicts of arrays) as an orbax checkpoint directory.

    Args:
      params: the tree; arrays anywhere (sharded device arrays are gathered to the host).
      path: destination directory; must not exist unless ``overwrite``.
      overwrite: replace an existing checkpoint at ``path``.
      metadata: JSON-serialisable dict written to ``path/subboost.json``.

    Returns:
      The absolute destination path.
    """
    import orbax.checkpoint as ocp

    if not leaves_with_paths(params):
        raise SubboostError("save_params: the parameter tree is empty.")
    host = _to_host(params)
    meta_text = None if metadata is None else json.dumps(metadata, indent=2, sort_keys=True, default=str)

    def build(target: Path) -> None:
        checkpointer = ocp.PyTreeCheckpointer()
        checkpointer.save(target, args=ocp.args.PyTreeSave(host))
        checkpointer.close() if hasattr(checkpointer, "close") else None
        if meta_text is not None:
            (target / METADATA_FILE).write_text(meta_text + "\n")

    return write_atomically(path, build, overwrite=overwrite)


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``subboost.json`` metadata of a checkpoint (architecture, source hashes), or None."""
    meta = Path(path) / METADATA_FILE
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SubboostError(f"{meta}: unreadable checkpoint metadata ({err}).") from err


def _restore_orbax(path: Path) -> PyTree:
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(path.absolute())
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        # Restore as host numpy: works on any machine, whatever devices / sharding it was saved from.
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as err:  # orbax / tensorstore raise many types for a damaged directory
        raise SubboostError(f"{path}: cannot restore the orbax checkpoint ({type(err).__name__}: {err}).") from err


def load_params(path: str | os.PathLike, *, as_numpy: bool = False) -> PyTree:
    """Restores a parameter pytree saved by `save_params` (or a converter) on the host.

    Also reads the other formats subboost writes: a streaming merge output directory
    (``params.safetensors``) or a ``.safetensors`` file with ``"a/b/c"`` keys.

    Args:
      path: the checkpoint.
      as_numpy: return numpy arrays instead of jax arrays on the default device.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    if is_checkpoint_dir(path):
        tree = _restore_orbax(path)
    else:
        from subboost.streaming import read_params

        tree = read_params(path)
    if as_numpy:
        return jax.tree_util.tree_map(np.asarray, tree)
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _architecture(info: Mapping[str, Any] | None) -> Any:
    return None if info is None else (info.get("kind"), info.get("architecture"))


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
      SubboostError: an expert has a different architecture, missing or extra parameters
        (all listed), a parameter of another shape or dtype, or non-finite values.
    """
    from subboost.task_vectors import task_vectors

    experts = [Path(p) for p in experts]
    if not experts:
        raise SubboostError("load_experts needs at least one expert checkpoint; the list is empty.")
    if isinstance(base, (str, os.PathLike)):
        base_name = f"base ({base})"
        base_info = checkpoint_info(base) if Path(base).is_dir() else None
        base_params = load_params(base)
    else:
        base_name, base_info, base_params = "base", None, base
    loaded = []
    for t, path in enumerate(experts):
        what = f"expert {t} ({path})"
        info = checkpoint_info(path) if path.is_dir() else None
        if check_architecture and base_info is not None and info is not None:
            if _architecture(info) != _architecture(base_info):
                raise SubboostError(
                    f"{what} has architecture {_architecture(info)}, but {base_name} has {_architecture(base_info)}."
                )
        params = load_params(path)
        check_expert_against_base(base_params, params, what=what, base_name=base_name)
        loaded.append(params)
    return task_vectors(base_params, loaded)
