"""Bounded-memory merging: experts streamed from disk one group of layers at a time.

Twenty ViT-L/14 experts are 24 GB in float32; the in-memory path stacks them
all. `merge_from_checkpoints` instead reads, per *chunk* (a group of
parameters of at most ``chunk_bytes`` across all experts, never splitting a
parameter or an attention block's q/k/v), that chunk from the base and from
every expert, forms the stacked task vectors of the chunk, merges, boosts,
optionally applies ``alpha``, and appends the result to the output file. Peak
memory is about one chunk across all experts plus its temporaries.

Exactness. Methods whose output at a parameter depends only on that parameter
(weight averaging, Task Arithmetic, Consensus-TA — its TALL masks are
elementwise once ``tau_MTL = sum_t tau_t`` is, TSV-M, Iso-C, Iso-CTS, every
matrix of Subspace Boosting) are run chunk by chunk through `subboost.merge`.
Methods with global statistics take extra read passes that accumulate exact
integer statistics before the merging pass:

* TIES's per-task threshold ``v_t``, the ``kk``-th smallest ``|tau_t|`` over
  the whole task vector (``kk = N - int(N k)``), is found by **radix select
  on bit patterns**: non-negative floats order like their bit patterns, so a
  pass accumulating, per task, a 65536-bin histogram of the top 16 bits
  locates the bin holding rank ``kk``; a second pass histograms the next 16
  bits inside that bin. Two passes for float32 (four for float64), and the
  result is bit-for-bit the value `subboost.merging.ties.kth_smallest_magnitude`
  finds by bisection in memory.
* TIES's sign election gives entries whose trimmed sum is zero the sign of
  ``sum(sign(sum_t trimmed_t))`` over all parameters: one more pass counts it
  (exactly, in integers).
* DARE's drop mask of leaf ``i`` uses ``split(key, num_leaves)[i]``, as in
  memory, so no pass is needed; DARE-TIES and Consensus-TIES take TIES's passes.

Passes: 1 for local methods, 4 for TIES / DARE-TIES / Consensus-TIES with the
default global trim (2 with ``scope="per_leaf"``).

Modules: `chunks` (which parameters are read together, and reading them),
`kernels` (DARE / TIES / Consensus-TIES on one chunk, the in-memory methods'
own kernels with the global statistics passed in), `statistics` (TIES's
read passes), `steps` (checking and opening the inputs, the merging pass), `merge`
(the entry point), `pod` (several `jax.distributed` processes, each reading, merging and
writing only its share of the parameters; docs/pods.md). How each method streams is part of
its record (`subboost.merging.registry.MergeMethod.streaming`). Checkpoint
formats are `subboost.checkpoint_io`'s; the staged output is
`subboost.outputs.staged_output`.

Checkpoint formats read (all lazily, one chunk at a time), by `open_checkpoint`:

* a ``.safetensors`` file whose keys are parameter paths ``"a/b/c"`` (read
  with positioned reads, no memory map, so untouched tensors cost nothing);
* an orbax PyTree checkpoint directory, e.g. one written by
  `subboost.checkpoints.save_params` or a converter (orbax partial restore of
  the chunk; architectures recorded in ``subboost.json`` must agree);
* a finished output directory of this module (``params.safetensors``);
* for the base only: a parameter pytree already in memory.

Output: a directory ``out`` holding ``params.safetensors`` (the merged task
vector, or merged parameters when ``alpha`` is given), ``merge_info.json``
and a ``COMPLETE`` marker. It is built inside a hidden sibling directory
``.{out}.partial-*`` and renamed into place only when complete, so an
interrupted run never leaves anything at ``out``; the next run removes a dead
run's partial directory. Every input is validated (readable, same parameter
paths, shapes and dtypes as the base, hyper-parameters) before anything is
written; non-finite values, found while streaming, abort the run with the
file and parameter named and nothing at ``out``.
"""

from __future__ import annotations

import dataclasses

from subboost.checkpoint_io.metadata import COMPLETE_MARKER, INFO_FILE, PARAMS_FILE, check_same_parameters
from subboost.checkpoint_io.readers import (
    CheckpointReader,
    OrbaxReader,
    SafetensorsReader,
    TreeReader,
    open_checkpoint,
    read_params,
)
from subboost.checkpoint_io.safetensors_format import SafetensorsWriter, read_safetensors_header, save_safetensors
from subboost.errors import SubboostError
from subboost.merging.registry import METHODS, StreamingScheme, local_scheme, method_record, register
from subboost.streaming.chunks import DEFAULT_CHUNK_BYTES, plan_chunks
from subboost.streaming.merge import merge_from_checkpoints


def register_local_method(name: str) -> None:
    """Declares a registered merge method local (per parameter / per matrix): streamed chunk by chunk."""
    register(dataclasses.replace(method_record(name), streaming=local_scheme(name)))


def streaming_scheme(method: str, kwargs: dict) -> StreamingScheme:
    """The `StreamingScheme` of ``method`` with hyper-parameters ``kwargs`` (its registry record's)."""
    record = method_record(method)
    if record.streaming is None:
        raise SubboostError(f"merge_from_checkpoints: no streaming scheme for method {method!r}.")
    return record.streaming(kwargs)


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointReader",
    "DEFAULT_CHUNK_BYTES",
    "INFO_FILE",
    "METHODS",
    "OrbaxReader",
    "PARAMS_FILE",
    "SafetensorsReader",
    "SafetensorsWriter",
    "StreamingScheme",
    "TreeReader",
    "check_same_parameters",
    "merge_from_checkpoints",
    "open_checkpoint",
    "plan_chunks",
    "read_params",
    "read_safetensors_header",
    "register_local_method",
    "save_safetensors",
    "streaming_scheme",
]
