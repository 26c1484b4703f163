"""`merge_from_checkpoints`: the streaming merge's entry point (see `subboost.streaming`)."""

from __future__ import annotations

import datetime
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.boosting import check_boost_arguments, check_rank_arguments, subspace_boost
from subboost.checkpoint_io.metadata import (
    COMPLETE_MARKER,
    INFO_FILE,
    PARAMS_FILE,
    array_checksum,
    check_same_architecture,
    check_same_parameters,
    require_content,
    specs_of,
)
from subboost.checkpoint_io.huggingface import name_rules, output_writer, parse_size
from subboost.checkpoint_io.readers import open_checkpoint
from subboost.errors import SubboostError
from subboost.merging import merge
from subboost.merging.registry import METHODS, MergeMethod, check_arguments
from subboost.outputs import check_output, staged_output
from subboost.streaming.chunks import DEFAULT_CHUNK_BYTES, ChunkStream, plan_chunks
from subboost.streaming.kernels import merge_elementwise
from subboost.streaming.statistics import global_statistics
from subboost.task_vectors import apply_task_vector
from subboost.tree import ATTENTION_MODES, PyTree, leaves_with_paths, matrix_plan, nest
from subboost.validation import no_matrices_message


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        return {"prng_key_data": np.asarray(jax.random.key_data(value)).tolist()}
    return repr(value)


def _boost_options(boost: float | Mapping[str, Any] | None) -> dict[str, Any] | None:
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


def _require_matrices(specs: Mapping[str, jax.ShapeDtypeStruct], record: MergeMethod, boost_options: Any,
                      method_kwargs: Mapping[str, Any]) -> None:
    """Whole-model check (a chunk may hold no matrix): boosting and matrix methods need one."""
    tree = nest(dict(specs))
    users = [("subspace_boost", boost_options)] if boost_options is not None else []
    if record.matrix_kernel is not None:
        users.append((record.name, method_kwargs))
    for what, options in users:
        is_matrix = options.get("is_matrix")
        if not matrix_plan(tree, is_matrix=is_matrix, attention=options.get("attention", "per_qkv")).members:
            raise SubboostError(no_matrices_message(tree, what=what, is_matrix=is_matrix))


def merge_from_checkpoints(
    base: str | os.PathLike | PyTree,
    expert_paths: Sequence[str | os.PathLike],
    /,
    *,
    method: str = "task_arithmetic",
    boost: float | Mapping[str, Any] | None = None,
    out: str | os.PathLike,
    alpha: float | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    shard_size: int | str | None = None,
    **method_kwargs: Any,
) -> Path:
    """Merges (and boosts) experts streamed from disk, writing the result incrementally.

    Computes what the in-memory path computes::

        tvs = sb.task_vectors(base, experts)
        tau = sb.merge(tvs, method, **method_kwargs)
        tau = sb.subspace_boost(tau, **boost)              # if boost
        result = tau if alpha is None else sb.apply_task_vector(base, tau, alpha)

    with memory for one chunk of ``chunk_bytes`` across all experts instead
    of all experts at once (see the module docstring for the exact schemes
    of TIES, DARE and Consensus). Elementwise methods give bit-identical
    results; SVD-based steps (boosting, TSV-M, Iso) run on smaller batches of
    the same matrices and agree to float rounding.

    Args:
      base: the pretrained checkpoint (path, see `open_checkpoint`), or its
        parameter pytree in memory (positional: ``base=`` is a hyper-parameter
        of DARE and Consensus).
      expert_paths: the fine-tuned experts' checkpoints, same parameters as ``base``.
      method: a registered merge method with a streaming scheme (`streaming_scheme`).
      boost: ``None`` (no boosting), a ``beta``, or a dict of
        `subboost.subspace_boost` keywords (``beta``, ``attn_beta``, ``rank_rtol``, ``mode``, ``attention``,
        ``is_matrix``, ``batch_size``, ``solver``, ...).
      out: output directory (``params.safetensors`` + ``merge_info.json`` +
        ``COMPLETE``); it must not exist unless ``overwrite``.
      alpha: ``None`` writes the merged task vector (boost once, sweep alpha
        later); a float writes ``base + alpha * tau``.
      overwrite: replace an existing ``out`` -- a merge output or checkpoint
        directory, never another folder -- once the new one is complete.
      chunk_bytes: bytes of one chunk summed over experts (the memory knob).
      progress: show tqdm progress bars.
      shard_size: a Hugging Face base with ``alpha`` writes a Hugging Face directory
        (`subboost.checkpoint_io.huggingface`) in safetensors shards of at most this many
        bytes (an int, or ``"5GB"``, ``"500MB"``; default 5GB).
      **method_kwargs: the method's hyper-parameters (as for `subboost.merge`).

    Returns:
      The output directory, complete.

    Raises:
      FileExistsError: ``out`` exists and ``overwrite`` is False.
      FileNotFoundError: a checkpoint path does not exist.
      SubboostError: unreadable checkpoint, missing/unexpected parameter,
        shape or dtype mismatch (naming the file and parameter path), bad
        hyper-parameters, non-finite values -- all but the last before
        anything is written.
    """
    out = Path(out)
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
    boost_options = _boost_options(boost)
    shard_bytes = None if shard_size is None else parse_size(shard_size)

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
    method_kwargs, boost_options = name_rules(base_reader, record, method_kwargs, boost_options)
    scheme = record.streaming(method_kwargs)
    _require_matrices(base_reader.specs, record, boost_options, method_kwargs)

    specs = base_reader.specs
    names = list(specs)
    out_specs = {n: (tuple(specs[n].shape), np.dtype(jax.dtypes.canonicalize_dtype(specs[n].dtype))) for n in names}
    stream = ChunkStream(
        base=base_reader,
        experts=experts,
        chunks=plan_chunks(specs, len(experts) + 1, chunk_bytes),
        progress=progress,
        keys=None if scheme.drop_p is None else jax.random.split(method_kwargs["key"], len(names)),
        drop_p=scheme.drop_p,
    )

    with staged_output(out, overwrite=overwrite, inputs=inputs, name="out") as staging:
        thresholds, majority, passes = global_statistics(stream, scheme)
        info = {
            "format": "subboost.streaming/1",
            "content": "task_vector" if alpha is None else "params",
            "method": method,
            "method_kwargs": _jsonable(method_kwargs),
            "boost": _jsonable(boost_options),
            "alpha": alpha,
            "base": base_reader.source,
            "architecture": None if base_identity["architecture"] is None else dict(
                zip(("kind", "architecture"), base_identity["architecture"])),
            "experts": [r.source for r in experts],
            "num_parameters": len(names),
            "chunks": len(stream.chunks),
            "read_passes": passes + 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        writer = output_writer(staging, out_specs, base=base_reader, content=info["content"],
                               metadata={"format": info["format"], "content": info["content"]},
                               shard_bytes=shard_bytes, params_file=PARAMS_FILE)
        checksums: dict[str, str] = {}
        try:
            label = f"pass {passes + 1}/{passes + 1}: merge" + (" + boost" if boost_options else "") + " + write"
            for chunk_names, tvs, base_arrays in stream.stream(label, check_finite=passes == 0):
                result = _merge_chunk(chunk_names, tvs, base_arrays, stream, scheme, thresholds, majority,
                                      boost_options, alpha)
                del tvs
                for name in chunk_names:
                    array = np.asarray(result[name])
                    if not np.isfinite(array.astype(np.float32) if array.dtype.itemsize < 4 else array).all():
                        raise SubboostError(
                            f"the merged result: parameter {name!r} is NaN or infinite (overflow in "
                            f"{array.dtype.name}?); nothing was written to {out}."
                        )
                    checksums[name] = array_checksum(array)
                    writer.write(name, array)
                del result
        except BaseException:
            writer.abort()
            raise
        writer.close()
        info.update(getattr(writer, "provenance", dict)())
        info["checksums"] = {name: checksums[name] for name in names}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        (staging / COMPLETE_MARKER).write_text(info["created"] + "\n")
    return out


def _merge_chunk(names, tvs, base_arrays, stream, scheme, thresholds, majority, boost_options, alpha
                 ) -> dict[str, jax.Array]:
    if scheme.local is not None:
        merged_tree = merge(nest(dict(zip(names, tvs))), scheme.local, validate=False, **dict(scheme.local_kwargs))
        merged = dict(leaves_with_paths(merged_tree))
    else:
        masks = stream.masks(names, tvs)
        merged = dict(zip(names, merge_elementwise(tvs, masks, thresholds, majority, scheme=scheme)))
    if boost_options is not None:  # per matrix: exact chunk by chunk
        merged = dict(leaves_with_paths(subspace_boost(nest(merged), **boost_options, validate=False)))
    if alpha is not None:
        params = apply_task_vector(nest({n: base_arrays[n] for n in names}), nest(merged), alpha)
        merged = dict(leaves_with_paths(params))
    return merged


__all__ = ["merge_from_checkpoints"]
