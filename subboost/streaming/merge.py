"""`merge_from_checkpoints`: the streaming merge's entry point (see `subboost.streaming`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from subboost.checkpoint_io.metadata import COMPLETE_MARKER, INFO_FILE, PARAMS_FILE
from subboost.checkpoint_io.huggingface import output_writer, parse_size
from subboost.outputs import staged_output
from subboost.streaming.chunks import DEFAULT_CHUNK_BYTES, plan_chunks
from subboost.streaming.statistics import global_statistics
from subboost.streaming.steps import merge_info, merge_stream, open_inputs
from subboost.tree import PyTree


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
        result = tau if alpha is None else sb.apply_task_vector(base, tau, alpha=alpha)

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
    if jax.process_count() > 1:  # a pod: every process reads, merges and writes only its share
        from subboost.streaming.pod import merge_on_processes

        return merge_on_processes(base, expert_paths, out=out, overwrite=overwrite, method=method,
                                  method_kwargs=method_kwargs, boost=boost, alpha=alpha, chunk_bytes=chunk_bytes,
                                  progress=progress)
    out = Path(out)
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    run = open_inputs(base, expert_paths, method=method, boost=boost, out=out, alpha=alpha, overwrite=overwrite,
                      chunk_bytes=chunk_bytes, method_kwargs=method_kwargs)
    names = list(run.specs)
    stream = run.stream(plan_chunks(run.specs, len(run.experts) + 1, chunk_bytes), progress=progress)

    with staged_output(out, overwrite=overwrite, inputs=run.paths, name="out") as staging:
        statistics = global_statistics(stream, run.scheme)
        info = merge_info(run, chunks=len(stream.chunks), read_passes=statistics[2] + 1)
        writer = output_writer(staging, run.output_specs(names), base=run.base, content=info["content"],
                               metadata={"format": info["format"], "content": info["content"]},
                               shard_bytes=shard_bytes, params_file=PARAMS_FILE)
        try:
            checksums = merge_stream(run, stream, statistics, out=out, write=writer.write)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        info.update(getattr(writer, "provenance", dict)())
        info["files"] = sorted(os.listdir(staging))  # what --overwrite may replace later (`subboost.outputs`)
        info["checksums"] = {name: checksums[name] for name in names}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        (staging / COMPLETE_MARKER).write_text(info["created"] + "\n")
    return out


__all__ = ["merge_from_checkpoints"]
