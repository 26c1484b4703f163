"""The steps every streaming driver shares: one process (`merge`) or several (`pod`).

`open_inputs` checks the arguments and opens and compares every input before
anything is written; `merge_stream` merges (boosts, applies ``alpha`` to) every
chunk of a `ChunkStream` and hands each finished parameter to a writer;
`merge_info` is what ``merge_info.json`` records.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.boosting import check_boost_arguments, check_rank_arguments, subspace_boost
from subboost.checkpoint_io.metadata import (
    array_checksum,
    check_same_architecture,
    check_same_parameters,
    require_content,
    specs_of,
)
from subboost.checkpoint_io.huggingface import name_rules
from subboost.checkpoint_io.readers import CheckpointReader, open_checkpoint
from subboost.errors import SubboostError
from subboost.merging import merge
from subboost.merging.registry import METHODS, MergeMethod, StreamingScheme, check_arguments
from subboost.outputs import check_output
from subboost.streaming.chunks import ChunkStream
from subboost.streaming.kernels import merge_elementwise
from subboost.task_vectors import apply_task_vector
from subboost.tree import ATTENTION_MODES, PyTree, leaves_with_paths, matrix_plan, nest
from subboost.validation import no_matrices_message


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it (PRNG keys as their data, anything else unknown as its repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        return {"prng_key_data": np.asarray(jax.random.key_data(value)).tolist()}
    return repr(value)


def boost_options(boost: float | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``boost`` as complete `subspace_boost` keyword arguments (checked), or ``None``."""
    if boost is None:
        return None
    options = {"beta": boost} if isinstance(boost, (int, float)) and not isinstance(boost, bool) else boost
    if not isinstance(options, Mapping):
        raise SubboostError(f"boost must be None, a beta value or a dict of subspace_boost options; got {boost!r}.")
    parameters = inspect.signature(subspace_boost).parameters
    valid = [k for k in parameters if k not in ("tau", "validate", "mesh", "return_info")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SubboostError(f"boost: unknown option(s) {unknown}; valid ones: {valid}.")
    options = {**{k: parameters[k].default for k in valid}, **options}
    check_boost_arguments(options["beta"], options["mode"])
    check_rank_arguments(options["attn_beta"], options["rank_rtol"])
    if options["attention"] not in ATTENTION_MODES:
        raise SubboostError(f"boost: attention must be one of {ATTENTION_MODES}, got {options['attention']!r}.")
    batch = options["batch_size"]
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise SubboostError(f"boost: batch_size must be a positive integer or None, got {batch!r}.")
    options["beta"] = float(options["beta"])
    return options


def _identity(source: Any, what: str) -> dict[str, Any]:
    """What a path input holds (`subboost.checkpoints.checkpoint_identity`): model parameters only."""
    if not isinstance(source, (str, os.PathLike)):
        return {"content": "params", "architecture": None}
    if not Path(source).exists():
        raise FileNotFoundError(f"{what}: checkpoint {str(source)!r} does not exist.")
    return require_content(source, "params", what=what)


def _require_matrices(specs: Mapping[str, jax.ShapeDtypeStruct], record: MergeMethod, boost: Any,
                      method_kwargs: Mapping[str, Any]) -> None:
    """Whole-model check (a chunk may hold no matrix): boosting and matrix methods need one."""
    tree = nest(dict(specs))
    users = [("subspace_boost", boost)] if boost is not None else []
    if record.matrix_kernel is not None:
        users.append((record.name, method_kwargs))
    for what, options in users:
        is_matrix = options.get("is_matrix")
        if not matrix_plan(tree, is_matrix=is_matrix, attention=options.get("attention", "per_qkv")).members:
            raise SubboostError(no_matrices_message(tree, what=what, is_matrix=is_matrix))


@dataclasses.dataclass
class MergeInputs:
    """Everything a streaming merge checked before reading any array."""

    method: str
    method_kwargs: dict[str, Any]
    scheme: StreamingScheme
    boost: dict[str, Any] | None
    alpha: float | None
    base: CheckpointReader
    base_identity: dict[str, Any]
    experts: list[CheckpointReader]
    paths: list[str | os.PathLike]  # the input paths (never overwritten)

    @property
    def specs(self) -> dict[str, jax.ShapeDtypeStruct]:
        return self.base.specs

    def output_specs(self, names: Sequence[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of the output parameters ``names``."""
        return {n: (tuple(self.specs[n].shape), np.dtype(jax.dtypes.canonicalize_dtype(self.specs[n].dtype)))
                for n in names}

    def stream(self, chunks: list[list[str]], *, progress: bool, kind: type[ChunkStream] = ChunkStream
               ) -> ChunkStream:
        """The experts and base read chunk by chunk (DARE's keys: one per parameter of the whole tree)."""
        key = self.method_kwargs.get("key")
        return kind(
            base=self.base,
            experts=self.experts,
            chunks=chunks,
            progress=progress,
            keys=None if self.scheme.drop_p is None else jax.random.split(key, len(self.specs)),
            drop_p=self.scheme.drop_p,
        )


def open_inputs(
    base: str | os.PathLike | PyTree,
    expert_paths: Sequence[str | os.PathLike],
    *,
    method: str,
    boost: float | Mapping[str, Any] | None,
    out: str | os.PathLike,
    alpha: float | None,
    overwrite: bool,
    chunk_bytes: int,
    method_kwargs: Mapping[str, Any],
) -> MergeInputs:
    """Checks every argument, opens every input and compares it with the base (see `merge_from_checkpoints`)."""
    expert_paths = list(expert_paths)
    if not expert_paths:
        raise SubboostError("merge_from_checkpoints needs at least one expert checkpoint; the list is empty.")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise SubboostError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
        raise SubboostError(f"alpha must be None or a finite number, got {alpha!r}.")
    inputs = [p for p in (*expert_paths, base) if isinstance(p, (str, os.PathLike))]
    check_output(out, inputs=inputs, overwrite=overwrite, name="out")
    method_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in method_kwargs.items()}
    record = check_arguments(method, method_kwargs, len(expert_paths))
    if record.streaming is None:
        raise SubboostError(
            f"merge_from_checkpoints: no streaming scheme for method {method!r}. Streamable: "
            f"{sorted(n for n, r in METHODS.items() if r.streaming is not None)}; a method that acts on each "
            "parameter (or matrix) alone can be declared with subboost.streaming.register_local_method."
        )
    scheme = record.streaming(method_kwargs)
    options = boost_options(boost)

    # Every input is opened and compared with the base before anything is written.
    base_identity = _identity(base, "the base")
    base_reader = open_checkpoint(base)
    for path, spec in base_reader.specs.items():
        if not jnp.issubdtype(spec.dtype, jnp.floating):
            raise SubboostError(
                f"the base ({base_reader.source}): parameter {path!r} has non-float dtype "
                f"{np.dtype(spec.dtype).name}; only floating-point parameters can be merged."
            )
    if not base_reader.specs:
        raise SubboostError(f"the base ({base_reader.source}) has no parameters.")
    experts = []
    for t, path in enumerate(expert_paths):
        if not isinstance(path, (str, os.PathLike)):
            raise SubboostError(f"expert {t}: expected a checkpoint path, got {type(path).__name__}.")
        recorded = _identity(path, f"expert {t}")["architecture"]  # its message names the expert and file
        try:
            reader = open_checkpoint(path)
        except SubboostError as err:
            raise SubboostError(f"expert {t}: {err}") from err
        what, base_name = f"expert {t} ({reader.source})", f"the base ({base_reader.source})"
        check_same_parameters(specs_of(base_reader.specs), specs_of(reader.specs), what=what, base_name=base_name)
        check_same_architecture(recorded, base_identity["architecture"], what=what, base_name=base_name)
        experts.append(reader)
    # Tensor names of a Hugging Face directory: its family rules say which are matrices.
    method_kwargs, options = name_rules(base_reader, record, method_kwargs, options)
    scheme = record.streaming(method_kwargs)
    _require_matrices(base_reader.specs, record, options, method_kwargs)
    return MergeInputs(method=method, method_kwargs=method_kwargs, scheme=scheme, boost=options, alpha=alpha,
                       base=base_reader, base_identity=base_identity, experts=experts, paths=inputs)


def merge_info(run: MergeInputs, **extra: Any) -> dict[str, Any]:
    """What ``merge_info.json`` records (``extra``: the driver's own entries, e.g. ``chunks``)."""
    architecture = run.base_identity["architecture"]
    return {
        "format": "subboost.streaming/1",
        "content": "task_vector" if run.alpha is None else "params",
        "method": run.method,
        "method_kwargs": jsonable(run.method_kwargs),
        "boost": jsonable(run.boost),
        "alpha": run.alpha,
        "base": run.base.source,
        "architecture": None if architecture is None else dict(zip(("kind", "architecture"), architecture)),
        "experts": [r.source for r in run.experts],
        "num_parameters": len(run.specs),
        **extra,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def merge_stream(run: MergeInputs, stream: ChunkStream, statistics: tuple[Any, Any, int], *, out: Path,
                 write: Callable[[str, np.ndarray], None]) -> dict[str, str]:
    """The merging pass: every chunk merged (boosted, ``alpha`` applied), each parameter checked and written.

    Returns:
      ``{parameter path: checksum}`` of what was written.
    """
    thresholds, majority, passes = statistics
    checksums: dict[str, str] = {}
    label = f"pass {passes + 1}/{passes + 1}: merge" + (" + boost" if run.boost else "") + " + write"
    for chunk_names, tvs, base_arrays in stream.stream(label, check_finite=passes == 0):
        result = merge_chunk(chunk_names, tvs, base_arrays, stream, run.scheme, thresholds, majority,
                             run.boost, run.alpha)
        del tvs
        for name in chunk_names:
            array = np.asarray(result[name])
            if not np.isfinite(array.astype(np.float32) if array.dtype.itemsize < 4 else array).all():
                raise SubboostError(
                    f"the merged result: parameter {name!r} is NaN or infinite (overflow in "
                    f"{array.dtype.name}?); nothing was written to {out}."
                )
            checksums[name] = array_checksum(array)
            write(name, array)
        del result
    return checksums


def merge_chunk(names, tvs, base_arrays, stream, scheme, thresholds, majority, boost, alpha
                ) -> dict[str, jax.Array]:
    """One chunk's merged task vector (boosted, and ``base + alpha * tau`` when ``alpha`` is given)."""
    if scheme.local is not None:
        merged_tree = merge(nest(dict(zip(names, tvs))), scheme.local, validate=False, **dict(scheme.local_kwargs))
        merged = dict(leaves_with_paths(merged_tree))
    else:
        masks = stream.masks(names, tvs)
        merged = dict(zip(names, merge_elementwise(tvs, masks, thresholds, majority, scheme=scheme)))
    if boost is not None:  # per matrix: exact chunk by chunk
        merged = dict(leaves_with_paths(subspace_boost(nest(merged), **boost, validate=False)))
    if alpha is not None:
        params = apply_task_vector(nest({n: base_arrays[n] for n in names}), nest(merged), alpha=alpha)
        merged = dict(leaves_with_paths(params))
    return merged


__all__ = ["MergeInputs", "boost_options", "jsonable", "merge_chunk", "merge_info", "merge_stream", "open_inputs"]
