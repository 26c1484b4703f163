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
failed or interrupted save leaves nothing at the destination (`subboost.outputs.write_atomically`).

The formats themselves (orbax, safetensors, metadata, lazy readers, the expert-vs-base
checks) live in `subboost.checkpoint_io`; this module is the user-facing save / load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.checkpoint_io import metadata as checkpoint_metadata
from subboost.checkpoint_io.metadata import METADATA_FILE, checkpoint_identity, checkpoint_info, require_content
from subboost.checkpoint_io.orbax_io import restore_orbax, short_error
from subboost.checkpoint_io.readers import read_params
from subboost.outputs import check_output, write_atomically
from subboost.errors import SubboostError
from subboost.files import describe
from subboost.tree import PyTree, key_name, leaves_with_paths


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

    content = content if content is not None else checkpoint_metadata.default_content(metadata)
    if content not in checkpoint_metadata.CONTENTS:
        raise SubboostError(f"save_params: content must be one of {tuple(checkpoint_metadata.CONTENTS)}, got {content!r}.")
    if not leaves_with_paths(params):
        raise SubboostError("save_params: the parameter tree is empty.")
    key_paths = [tuple(key_name(k) for k in key_path) for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    checkpoint_metadata.check_leaf_names(key_paths, source=f"save_params({describe(path)!r})")
    check_output(path, inputs=inputs, overwrite=overwrite)  # before the (slow) device-to-host copy
    host = _to_host(params)
    meta = {k: v for k, v in (metadata or {}).items() if k not in ("checksums", "content", "subboost_checkpoint")}
    meta.update(subboost_checkpoint=checkpoint_metadata.FORMAT_VERSION, content=content,
                checksums={name: checkpoint_metadata.array_checksum(x) for name, x in leaves_with_paths(host)})
    meta_text = json.dumps(meta, indent=2, sort_keys=True, default=str)

    def build(target: Path) -> None:
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            checkpointer.save(target, args=ocp.args.PyTreeSave(host))
            (target / METADATA_FILE).write_text(meta_text + "\n")
        except Exception as err:  # tensorstore's errors carry a page of spec: one short line instead
            reason = "no space left on the device" if "No space left" in str(err) else short_error(err)
            message = f"{describe(path)}: cannot write the checkpoint ({reason}); nothing was written."
            if isinstance(err, OSError):
                raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
            raise SubboostError(message) from err
        finally:
            checkpointer.close() if hasattr(checkpointer, "close") else None

    return write_atomically(path, build, overwrite=overwrite, inputs=inputs)


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
    form = checkpoint_metadata.checkpoint_format(path)
    if content is not None:
        require_content(path, content)
    if form == "orbax":
        tree = restore_orbax(path)
        info = checkpoint_info(path)
        checkpoint_metadata.verify_checksums(path, dict(leaves_with_paths(tree)), None if info is None else info.get("checksums"))
    else:
        tree = read_params(path)
    if as_numpy:
        return jax.tree_util.tree_map(np.asarray, tree)
    return jax.tree_util.tree_map(jnp.asarray, tree)


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
    base_specs = checkpoint_metadata.specs_of(dict(leaves_with_paths(base_params)))
    loaded = []
    for t, path in enumerate(experts):
        name = f"{role} {t}" if role == "expert" else role
        what = f"{name} ({path})"
        if not path.exists():
            raise FileNotFoundError(f"{what} does not exist.")
        arch = require_content(path, "params", what=name)["architecture"]
        if check_architecture:
            checkpoint_metadata.check_same_architecture(arch, base_arch, what=what, base_name=base_name)
        params = load_params(path)
        checkpoint_metadata.check_same_parameters(base_specs, checkpoint_metadata.specs_of(dict(leaves_with_paths(params))),
                                                  what=what, base_name=base_name)
        check_finite(params, what=what)
        loaded.append(params)
    return base_params, task_vectors(base_params, loaded, validate=False)


__all__ = [
    "METADATA_FILE",
    "checkpoint_identity",
    "checkpoint_info",
    "load_base_and_experts",
    "load_experts",
    "load_params",
    "require_content",
    "save_params",
]
