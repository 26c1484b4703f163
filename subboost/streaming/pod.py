"""Pod scale: every process reads, merges and writes only its share of the parameters.

Under `jax.distributed` (``jax.process_count() = P > 1``) `merge_from_checkpoints`
comes here. The parameters are cut into *units* -- one parameter, or the q/k/v
kernels of one attention block, exactly the pieces `plan_chunks` never splits --
and the units are dealt to the processes largest first, each to the process with
the fewest bytes so far (`assign_shares`). Every process computes the same deal
from the checkpoint headers alone. With ``S`` the bytes of all parameters and
``u`` the largest unit,

    bytes of process p  <=  S / P + u

(the last unit given to the fullest process found it at or below the mean). A
process then streams its share exactly as one process streams everything:
chunk by chunk from the base and every expert, merging, boosting and applying
``alpha`` per chunk, and writes the result to a shard of its own. Per-process
reads are about ``1/P`` of the inputs (times the read passes), per-process
memory one chunk.

Why this is exact. Every streamable method is local -- its output at a
parameter (a matrix, for TSV-M, Iso and boosting) depends on that parameter
alone -- except for TIES's two global statistics (the per-task trim threshold
and the tie-breaking sign), which the streaming path already builds from
integer counts: 65536-bin histograms per read pass and a sign balance. Here
each process counts over its share and the counts are summed over processes
(`ProcessGroup.sum`), exactly, so thresholds and signs are the one-process
values bit for bit; TA, TIES, DARE (keys split over the whole tree) and
Consensus give bit-identical results and SVD-based steps agree to float rounding.

Global arrays. The processes exchange bytes through one global array per
exchange: each process contributes its row with
`jax.make_array_from_process_local_data` over a ``(processes, local devices)``
mesh, and a jitted identity with replicated output sharding gathers the rows
(gloo on CPU, the ICI/DCN collectives on TPU).

Failure. Every step that may fail on one process only (opening the inputs,
reading a chunk, writing a shard, the final rename) ends in an exchange of
error messages (`ProcessGroup.agree`), so when one process cannot read its share
every process raises the same `ProcessFailure` -- one line naming the process and
the file -- instead of waiting in a collective. A process that dies outright is
detected by the JAX coordination service's heartbeat (``heartbeat_timeout_seconds``
of `jax.distributed.initialize`, 100 s by default), which stops the others.

Output. Process 0 stages ``out`` (`subboost.outputs.staged_output`; ``out``
must lie on a file system every process sees); process ``p`` writes
``params-{p+1:05d}-of-{P:05d}.safetensors`` into it; once every shard is
written, process 0 writes the index ``params.safetensors.index.json``,
``merge_info.json`` (with every process's bytes read) and ``COMPLETE``, and
renames the directory into place. The output is complete or absent.
`open_checkpoint` reads it like a one-process output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subboost.checkpoint_io.metadata import COMPLETE_MARKER, INFO_FILE
from subboost.checkpoint_io.safetensors_format import SafetensorsWriter
from subboost.checkpoint_io.shards import SHARD_INDEX_FILE, shard_file_name, write_shard_index
from subboost.errors import SubboostError
from subboost.outputs import staged_output
from subboost.streaming.chunks import ChunkStream, plan_chunks
from subboost.streaming.statistics import global_statistics
from subboost.streaming.steps import merge_info, merge_stream, open_inputs
from subboost.tree import PyTree

Result = TypeVar("Result")


class ProcessFailure(SubboostError):
    """A step failed on at least one process; every process raises this same error."""


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 100) -> None:
    """Starts `jax.distributed` (gloo collectives on CPU); call it first, in every process.

    Arguments left ``None`` come from the environment: ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; on a
    Cloud TPU pod (and SLURM, Open MPI) JAX detects all three itself.

    Args:
      coordinator_address: ``host:port`` that process 0 listens on.
      num_processes: ``P``.
      process_id: this process's index in ``0 .. P - 1``.
      heartbeat_timeout_seconds: after how long without a heartbeat a dead process
        stops the others.
    """
    environ = os.environ
    if num_processes is None and environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(environ["JAX_NUM_PROCESSES"])
    if process_id is None and environ.get("JAX_PROCESS_ID"):
        process_id = int(environ["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes: collectives over TCP
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def assign_shares(specs: Mapping[str, jax.ShapeDtypeStruct], num_processes: int) -> list[list[str]]:
    """Each process's parameters (in `plan_chunks` order): units dealt largest first to the least-filled process.

    A unit is a parameter, or an attention block's q/k/v (never split, see `plan_chunks`).
    Ties go to the lower process index, so every process computes the same deal.
    """
    units = plan_chunks(specs, 1, 1)  # a budget of 1 byte: every unit a chunk of its own
    sizes = [sum(int(np.prod(specs[n].shape)) * np.dtype(specs[n].dtype).itemsize for n in unit) for unit in units]
    loads = [0] * num_processes
    owner = [0] * len(units)
    for u in sorted(range(len(units)), key=lambda i: (-sizes[i], i)):
        p = min(range(num_processes), key=lambda q: (loads[q], q))
        owner[u] = p
        loads[p] += sizes[u]
    return [[n for u, unit in enumerate(units) if owner[u] == p for n in unit] for p in range(num_processes)]


class ProcessGroup:
    """Byte exchanges between the processes of `jax.distributed`, through global arrays."""

    def __init__(self):
        self.count = jax.process_count()
        self.index = jax.process_index()
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.asarray(devices).reshape(self.count, -1), ("processes", "local"))
        self._rows = NamedSharding(mesh, PartitionSpec("processes"))
        self._gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def _gather_rows(self, row: np.ndarray) -> np.ndarray:
        """``(P, n)`` uint8: every process's ``row`` (all of length ``n``)."""
        stacked = jax.make_array_from_process_local_data(self._rows, row[None], (self.count, row.size))
        return np.asarray(self._gather(stacked))

    def all_gather(self, data: bytes) -> list[bytes]:
        """Every process's ``data``, in process order."""
        sizes = self._gather_rows(np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)).view(np.int64)[:, 0]
        row = np.zeros(max(1, int(sizes.max())), np.uint8)
        row[: len(data)] = np.frombuffer(data, np.uint8)
        rows = self._gather_rows(row)
        return [rows[p, : sizes[p]].tobytes() for p in range(self.count)]

    def agree(self, error: BaseException | None) -> None:
        """Raises `ProcessFailure` on every process if ``error`` is set on any; else returns on every one."""
        message = "" if error is None else " ".join(str(error.args[0] if isinstance(error, KeyError) and error.args
                                                        else error).split()) or type(error).__name__
        failed = [(p, m.decode()) for p, m in enumerate(self.all_gather(message.encode())) if m]
        if failed:
            first, text = failed[0]
            others = f" (and process{'es' if len(failed) > 2 else ''} {', '.join(str(p) for p, _ in failed[1:])})"
            raise ProcessFailure(f"process {first} of {self.count}{others if len(failed) > 1 else ''}: {text}")

    def run(self, step: Callable[[], Result]) -> Result:
        """``step()`` on every process, then `agree`: its result where it succeeded everywhere."""
        result, error = None, None
        try:
            result = step()
        except ProcessFailure:
            raise
        except Exception as err:  # reported to every process by agree
            error = err
        self.agree(error)
        return result

    def sum(self, array: np.ndarray, *, error: BaseException | None = None) -> np.ndarray:
        """The sum over processes of every process's ``array`` (same shape and dtype everywhere), exactly.

        Sent as raw bytes, so int64 counts stay int64 without ``jax_enable_x64``;
        ``error``: this process failed before finishing ``array`` (see `agree`).
        """
        self.agree(error)
        array = np.ascontiguousarray(array)
        rows = self._gather_rows(array.reshape(-1).view(np.uint8))
        return rows.view(array.dtype).reshape((self.count,) + array.shape).sum(axis=0, dtype=array.dtype)


class CountingReader:
    """A checkpoint reader that counts the bytes of the tensors it returns."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.source = reader.source
        self.specs = reader.specs
        self.bytes_read = 0

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        arrays = self.reader.read(names)
        self.bytes_read += sum(int(a.nbytes) for a in arrays.values())
        return arrays


@dataclasses.dataclass
class GuardedStream(ChunkStream):
    """A `ChunkStream` that stops at a read error and keeps it, for `ProcessGroup.agree` to report."""

    error: BaseException | None = None

    def stream(self, desc: str, *, check_finite: bool) -> Iterator[tuple[list[str], list[jax.Array], dict]]:
        if self.error is not None:
            return
        try:
            yield from super().stream(desc, check_finite=check_finite)
        except Exception as err:
            self.error = err


def merge_on_processes(base: str | os.PathLike | PyTree, expert_paths: Sequence[str | os.PathLike], /, *,
                       out: str | os.PathLike, overwrite: bool, method: str, method_kwargs: Mapping[str, Any],
                       boost: float | Mapping[str, Any] | None, alpha: float | None, chunk_bytes: int,
                       progress: bool) -> Path:
    """`merge_from_checkpoints` over the processes of `jax.distributed`, each on its share (module docstring).

    Takes `merge_from_checkpoints`'s arguments (the method's hyper-parameters as
    ``method_kwargs``); every process calls it with the same ones. Returns ``out``,
    complete, on every process; raises the same `ProcessFailure` on every process if
    any failed.
    """
    group = ProcessGroup()
    out = Path(out)
    run = group.run(lambda: open_inputs(base, expert_paths, method=method, boost=boost, out=out, alpha=alpha,
                                        overwrite=overwrite, chunk_bytes=chunk_bytes, method_kwargs=method_kwargs))
    run.base = CountingReader(run.base)
    run.experts = [CountingReader(r) for r in run.experts]
    mine = assign_shares(run.specs, group.count)[group.index]
    local_specs = {n: run.specs[n] for n in mine}
    stream = run.stream(plan_chunks(local_specs, len(run.experts) + 1, chunk_bytes),
                        progress=progress and group.index == 0, kind=GuardedStream)
    error = None
    try:
        with contextlib.ExitStack() as stack:
            def stage() -> bytes:
                if group.index != 0:
                    return b""
                return str(stack.enter_context(staged_output(out, overwrite=overwrite, inputs=run.paths,
                                                             name="out"))).encode()

            staging = Path(group.all_gather(group.run(stage))[0].decode())
            statistics = global_statistics(stream, run.scheme, combine=lambda x: group.sum(x, error=stream.error))
            shard = shard_file_name(group.index, group.count)
            info = merge_info(run, processes=group.count, read_passes=statistics[2] + 1)

            def write_share() -> dict[str, str]:
                writer = SafetensorsWriter(staging / shard, run.output_specs(mine),
                                           metadata={"format": info["format"], "content": info["content"]})
                try:
                    checksums = merge_stream(run, stream, statistics, out=out, write=writer.write)
                    if stream.error is not None:
                        raise stream.error
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
                return checksums

            checksums = group.run(write_share)
            record = {"checksums": checksums, "chunks": len(stream.chunks),
                      "bytes_read": sum(r.bytes_read for r in (run.base, *run.experts))}
            records = [json.loads(r) for r in group.all_gather(json.dumps(record).encode())]

            def finish() -> None:
                if group.index != 0:
                    return
                shards = [shard_file_name(p, group.count) for p in range(group.count)]
                owners = {n: shards[p] for p, r in enumerate(records) for n in r["checksums"]}
                write_shard_index(staging / SHARD_INDEX_FILE, {n: owners[n] for n in run.specs},
                                  metadata={"format": info["format"], "content": info["content"]})
                every = {n: c for r in records for n, c in r["checksums"].items()}
                info.update(chunks=[r["chunks"] for r in records], bytes_read=[r["bytes_read"] for r in records],
                            shards=shards, checksums={n: every[n] for n in run.specs})
                (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
                (staging / COMPLETE_MARKER).write_text(info["created"] + "\n")

            group.run(finish)
    except ProcessFailure:
        raise  # every process raises it, at the same step
    except Exception as err:  # only process 0 can fail here: renaming the finished output into place
        error = err
    group.agree(error)
    return out


__all__ = [
    "CountingReader",
    "GuardedStream",
    "ProcessFailure",
    "ProcessGroup",
    "assign_shares",
    "initialize",
    "merge_on_processes",
]
