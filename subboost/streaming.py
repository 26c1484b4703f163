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
and a ``COMPLETE`` marker. It is built in a hidden sibling directory
``.{out}.partial-*`` and renamed into place only when complete, so an
interrupted run never leaves anything at ``out``; the next run removes a dead
run's partial directory. Every input is validated (readable, same parameter
paths, shapes and dtypes as the base, hyper-parameters) before anything is
written; non-finite values, found while streaming, abort the run with the
file and parameter named and nothing at ``out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from subboost.checkpoints import array_checksum
from subboost.task_vectors import SubboostError
from subboost.tree import ATTENTION_IN_NAMES, PyTree, leaves_with_paths

PARAMS_FILE = "params.safetensors"
INFO_FILE = "merge_info.json"
COMPLETE_MARKER = "COMPLETE"
OWNER_FILE = "owner.json"
DEFAULT_CHUNK_BYTES = 256 * 2**20

# ----------------------------------------------------------------------------
# safetensors: a JSON header of name -> dtype, shape, byte range, then raw data
# ----------------------------------------------------------------------------
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20


def _safetensors_dtype_name(dtype: Any, what: str) -> str:
    name = _SAFETENSORS_NAMES.get(np.dtype(dtype))
    if name is None:
        raise SubboostError(f"{what}: dtype {np.dtype(dtype).name} cannot be stored in safetensors.")
    return name


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file, checked against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SubboostError(f"{path}: not a safetensors file (shorter than 8 bytes).")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SubboostError(f"{path}: not a safetensors file (header length {header_len} is invalid).")
            raw = f.read(header_len)
    except OSError as err:
        raise SubboostError(f"{path}: cannot read the file ({err}).") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubboostError(f"{path}: not a safetensors file (corrupted header: {err}).") from err
    if not isinstance(header, dict):
        raise SubboostError(f"{path}: not a safetensors file (header is not a JSON object).")
    data_start = 8 + header_len
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SubboostError(f"{path}: parameter {name!r} has a malformed header entry {entry!r}.") from err
        if any(d < 0 for d in shape):
            raise SubboostError(f"{path}: parameter {name!r} has a negative dimension in its shape {list(shape)}.")
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SubboostError(f"{path}: parameter {name!r}: byte range {begin}..{end} does not fit shape {shape}.")
        if end > data_size:
            raise SubboostError(
                f"{path}: parameter {name!r} ends at byte {end} of the data, but the file holds only "
                f"{data_size} data bytes (truncated file?)."
            )
    return header, data_start


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor (header first: shapes are known up front).

    Tensors are laid out contiguously in the order of ``specs``; `write` may
    be called in any order, `close` checks that every tensor was written.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], Any]],
                 *, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _safetensors_dtype_name(dtype, f"{self.path}: parameter {name!r}"),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout[name] = (offset, tuple(shape), dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, array: Any) -> None:
        offset, shape, dtype = self._layout[name]
        array = np.asarray(array)
        if array.shape != shape or array.dtype != dtype:
            raise SubboostError(
                f"{self.path}: parameter {name!r} expected shape {shape} dtype {dtype.name}, "
                f"got shape {array.shape} dtype {array.dtype.name}."
            )
        self._file.seek(self._data_start + offset)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._written.add(name)

    def close(self) -> None:
        missing = [name for name in self._layout if name not in self._written]
        if missing:
            self._file.close()
            raise SubboostError(f"{self.path}: parameters never written: {missing[:5]}.")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def save_safetensors(tree: PyTree, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Writes a parameter pytree to one safetensors file with ``"a/b/c"`` keys."""
    flat = [(p, np.asarray(x)) for p, x in leaves_with_paths(tree)]
    writer = SafetensorsWriter(path, {p: (x.shape, x.dtype) for p, x in flat}, metadata=metadata)
    try:
        for p, x in flat:
            writer.write(p, x)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return Path(path)


# ----------------------------------------------------------------------------
# Lazy readers
# ----------------------------------------------------------------------------
def nest(flat: Mapping[str, Any]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _tree_order(paths: Sequence[str]) -> list[str]:
    """Paths in the order `jax.tree_util` flattens the nested dict they form."""
    return [p for p, _ in leaves_with_paths(nest({p: p for p in paths}))]


class CheckpointReader:
    """A checkpoint read lazily: parameter specs up front, arrays on request.

    Attributes:
      source: how the checkpoint is named in messages (its path).
      specs: ``{path: jax.ShapeDtypeStruct}`` in tree-flatten order.
    """

    source: str
    specs: dict[str, jax.ShapeDtypeStruct]

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class SafetensorsReader(CheckpointReader):
    """Positioned reads of single tensors from a safetensors file (no memory map)."""

    def __init__(self, path: str | os.PathLike, *, checksums: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.source = str(self.path)
        self._checksums = checksums  # recorded by a streaming merge (merge_info.json); verified on read
        header, self._data_start = read_safetensors_header(self.path)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.metadata = header.get("__metadata__", {})
        self._entries = entries
        self.specs = {
            name: jax.ShapeDtypeStruct(tuple(entries[name]["shape"]), _SAFETENSORS_DTYPES[entries[name]["dtype"]])
            for name in _tree_order(list(entries))
        }

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        with open(self.path, "rb") as f:
            for name in names:
                entry = self._entries[name]
                array = np.empty(tuple(entry["shape"]), _SAFETENSORS_DTYPES[entry["dtype"]])
                buffer = array.reshape(-1).view(np.uint8)
                f.seek(self._data_start + entry["data_offsets"][0])
                if f.readinto(buffer) != buffer.size:
                    raise SubboostError(f"{self.source}: parameter {name!r}: unexpected end of file.")
                out[name] = array
        _verify(self.source, out, self._checksums)
        return out


def _is_orbax_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA"))


class OrbaxReader(CheckpointReader):
    """Orbax PyTree checkpoint read by partial restore (only the requested leaves)."""

    def __init__(self, path: str | os.PathLike):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.path = Path(path).absolute()
        self.source = str(path)
        self._checkpointer = ocp.PyTreeCheckpointer()
        try:
            metadata = self._checkpointer.metadata(self.path)
        except Exception as err:  # orbax raises many types for a damaged directory
            raise SubboostError(f"{self.source}: cannot read the orbax checkpoint metadata ({err}).") from err
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        self.specs = {}
        for name, leaf in leaves_with_paths(tree):
            shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
            if shape is None or dtype is None:
                raise SubboostError(f"{self.source}: parameter {name!r} is not an array ({type(leaf).__name__}).")
            self.specs[name] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
        self._metadata_tree = tree
        from subboost.checkpoints import checkpoint_info

        info = checkpoint_info(self.path)
        self._checksums = None if info is None else info.get("checksums")

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        ocp = self._ocp
        wanted = set(names)
        as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
        placeholder = getattr(ocp, "PLACEHOLDER", None)
        if placeholder is not None:  # keeps the saved structure; skipped leaves are never read
            item = jax.tree_util.tree_map_with_path(
                lambda p, _: 0 if _path(p) in wanted else placeholder, self._metadata_tree
            )
            restore_args = jax.tree_util.tree_map_with_path(
                lambda p, _: as_numpy if _path(p) in wanted else placeholder, self._metadata_tree
            )
            args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        else:  # older orbax: restore a nested-dict subset
            item = nest({n: 0 for n in names})
            args = ocp.args.PyTreeRestore(item=item, restore_args=nest({n: as_numpy for n in names}),
                                          partial_restore=True)
        from subboost.checkpoints import quiet_event_loop_noise, short_error

        try:
            with quiet_event_loop_noise():
                restored = self._checkpointer.restore(self.path, args=args)
        except Exception as err:
            self.close()  # stops orbax's event loop cleanly (else "Event loop is closed" tracebacks at exit)
            raise SubboostError(
                f"{self.source}: cannot restore parameters {sorted(wanted)[:3]}"
                f"{' ...' if len(wanted) > 3 else ''} ({type(err).__name__}: {short_error(err)}); "
                "the checkpoint is damaged or incomplete."
            ) from err
        out = {p: np.asarray(x) for p, x in leaves_with_paths(restored) if p in wanted}
        missing = wanted.difference(out)
        if missing:
            raise SubboostError(f"{self.source}: restore did not return parameters {sorted(missing)[:5]}.")
        _verify(self.source, out, self._checksums)
        return out

    def close(self) -> None:
        if hasattr(self._checkpointer, "close"):
            self._checkpointer.close()


def _verify(source: str, arrays: Mapping[str, np.ndarray], checksums: Mapping[str, str] | None) -> None:
    from subboost.checkpoints import verify_checksums

    verify_checksums(source, arrays, checksums, complete=False)


def _path(key_path) -> str:
    from subboost.tree import path_str

    return path_str(key_path)


class TreeReader(CheckpointReader):
    """A parameter pytree already in memory, read like a checkpoint."""

    def __init__(self, tree: PyTree, *, source: str = "base (in memory)"):
        self.source = source
        self._leaves = dict(leaves_with_paths(tree))
        self.specs = {
            p: jax.ShapeDtypeStruct(tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))
            for p, x in self._leaves.items()
        }

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: np.asarray(self._leaves[name]) for name in names}


def open_checkpoint(source: str | os.PathLike | PyTree) -> CheckpointReader:
    """A lazy reader for a checkpoint path (format detected) or an in-memory pytree."""
    if isinstance(source, CheckpointReader):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return TreeReader(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    if path.is_file():
        return SafetensorsReader(path)
    if not path.is_dir():
        raise SubboostError(f"{path}: not a checkpoint (neither a .safetensors file nor a directory).")
    if (path / PARAMS_FILE).exists() or (path / INFO_FILE).exists():
        if not (path / COMPLETE_MARKER).exists():
            raise SubboostError(
                f"{path}: merge output without a {COMPLETE_MARKER} marker (an interrupted run?); re-run the merge."
            )
        try:
            checksums = json.loads((path / INFO_FILE).read_text()).get("checksums")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            raise SubboostError(f"{path / INFO_FILE}: unreadable merge metadata ({err}).") from err
        return SafetensorsReader(path / PARAMS_FILE, checksums=checksums)
    if _is_orbax_dir(path):
        return OrbaxReader(path)
    try:
        candidates = [p for p in sorted(path.iterdir()) if p.is_dir() and _is_orbax_dir(p)]
    except OSError as err:
        raise SubboostError(f"{path}: cannot read the directory ({err}).") from err
    if len(candidates) == 1:  # e.g. a checkpoint saved as one named item
        return OrbaxReader(candidates[0])
    raise SubboostError(
        f"{path}: unknown checkpoint format (expected a .safetensors file, an orbax checkpoint "
        f"directory or a subboost merge output directory)."
    )


def read_params(source: str | os.PathLike, names: Sequence[str] | None = None) -> dict:
    """Reads a whole checkpoint (or the parameters ``names``) into a nested dict of arrays."""
    reader = open_checkpoint(source)
    names = list(reader.specs) if names is None else list(names)
    unknown = [n for n in names if n not in reader.specs]
    if unknown:
        raise SubboostError(f"{reader.source}: no parameters {unknown[:5]}.")
    return nest(reader.read(names))


# ----------------------------------------------------------------------------
# Validation and chunking
# ----------------------------------------------------------------------------
def check_same_parameters(base: CheckpointReader, expert: CheckpointReader, *, what: str) -> None:
    """Raises unless ``expert`` has exactly ``base``'s parameter paths, shapes and dtypes."""
    missing = [p for p in base.specs if p not in expert.specs]
    if missing:
        raise SubboostError(
            f"{what} ({expert.source}): missing parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" that the base ({base.source}) has: a different architecture or an incomplete checkpoint."
        )
    extra = [p for p in expert.specs if p not in base.specs]
    if extra:
        raise SubboostError(
            f"{what} ({expert.source}): unexpected parameter {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f" that the base ({base.source}) lacks: a different architecture."
        )
    for path, spec in base.specs.items():
        other = expert.specs[path]
        if tuple(other.shape) != tuple(spec.shape) or np.dtype(other.dtype) != np.dtype(spec.dtype):
            raise SubboostError(
                f"{what} ({expert.source}): parameter {path!r} has shape {tuple(other.shape)} dtype "
                f"{np.dtype(other.dtype).name}, but the base ({base.source}) has shape {tuple(spec.shape)} "
                f"dtype {np.dtype(spec.dtype).name}: a different architecture."
            )


def _unit_key(path: str) -> str:
    """Parameters that must share a chunk: q/k/v of one attention block (fused in ``attention="full"``)."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-2] in ATTENTION_IN_NAMES:
        return "/".join(parts[:-2]) + "/<qkv>"
    return path


def plan_chunks(specs: Mapping[str, jax.ShapeDtypeStruct], num_experts: int, chunk_bytes: int) -> list[list[str]]:
    """Groups parameters into chunks of at most ``chunk_bytes`` over all experts.

    A parameter, or an attention block's q/k/v family, is never split; one
    larger than the budget forms a chunk of its own.
    """
    units: dict[str, list[str]] = {}
    for path in specs:
        units.setdefault(_unit_key(path), []).append(path)
    chunks: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for members in units.values():
        size = num_experts * sum(math.prod(specs[p].shape) * np.dtype(specs[p].dtype).itemsize for p in members)
        if current and current_bytes + size > chunk_bytes:
            chunks.append(current)
            current, current_bytes = [], 0
        current.extend(members)
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


# ----------------------------------------------------------------------------
# How each method streams
# ----------------------------------------------------------------------------
# Registered methods whose output at a parameter (or matrix) depends on that
# parameter (or matrix) alone: exact when run chunk by chunk.
LOCAL_METHODS: set[str] = {"weight_averaging", "task_arithmetic", "tsv", "iso_c", "iso_cts"}


def register_local_method(name: str) -> None:
    """Declares a registered merge method local (per parameter / per matrix): streamable."""
    LOCAL_METHODS.add(name)


@dataclasses.dataclass(frozen=True)
class StreamingScheme:
    """What a method needs when streamed.

    Attributes:
      local: registered method run on each chunk as is (``None``: elementwise scheme).
      local_kwargs: its hyper-parameters.
      drop_p: DARE's drop probability (``None``: no drop).
      ties: TIES's ``(k, merge, scope)`` (``None``: plain sum after the drop).
      consensus: Consensus's ``(lambdas, k)`` mask applied to the TIES merge.
    """

    local: str | None = None
    local_kwargs: tuple[tuple[str, Any], ...] = ()
    drop_p: float | None = None
    ties: tuple[float, str, str] | None = None
    consensus: tuple[Any, int] | None = None


def _default(fn: Callable, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def streaming_scheme(method: str, kwargs: Mapping[str, Any]) -> StreamingScheme:
    """The `StreamingScheme` of ``method`` with hyper-parameters ``kwargs``."""
    from subboost.merging import METHODS
    from subboost.merging.consensus import consensus
    from subboost.merging.dare import dare
    from subboost.merging.ties import ties

    kwargs = dict(kwargs)

    def ties_triple(k_name: str, own: set[str]) -> tuple[float, str, str]:
        extra = sorted(set(kwargs) - own - {k_name, "merge", "scope"})
        if extra:
            raise SubboostError(f"{method}: unknown hyper-parameter(s) {extra} for a TIES merge.")
        triple = (
            kwargs.get(k_name, _default(ties, "k")),
            kwargs.get("merge", _default(ties, "merge")),
            kwargs.get("scope", _default(ties, "scope")),
        )
        if triple[1] not in ("mean", "sum"):
            raise SubboostError(f"{method}: merge must be 'mean' or 'sum', got {triple[1]!r}.")
        if triple[2] not in ("global", "per_leaf"):
            raise SubboostError(f"{method}: scope must be 'global' or 'per_leaf', got {triple[2]!r}.")
        return triple

    if method in LOCAL_METHODS and method in METHODS:
        return StreamingScheme(local=method, local_kwargs=tuple(sorted(kwargs.items())))
    if method == "ties":
        return StreamingScheme(ties=ties_triple("k", set()))
    if method == "dare":
        base = kwargs.get("base", _default(dare, "base"))
        p = kwargs.get("p", _default(dare, "p"))
        if base == "ties":
            return StreamingScheme(drop_p=p, ties=ties_triple("k", {"key", "p", "base"}))
        if base == "task_arithmetic":
            extra = set(kwargs) - {"key", "p", "base"}
            if extra:
                raise SubboostError(f"dare: unknown hyper-parameter(s) {sorted(extra)} for base 'task_arithmetic'.")
            return StreamingScheme(drop_p=p)
        raise SubboostError(f"dare: base must be 'task_arithmetic' or 'ties', got {base!r}.")
    if method == "consensus":
        base = kwargs.get("base", _default(consensus, "base"))
        if base == "task_arithmetic":  # TALL masks and tau_MTL are elementwise
            return StreamingScheme(local="consensus", local_kwargs=tuple(sorted(kwargs.items())))
        if base == "ties":
            lambdas = kwargs.get("lambdas", _default(consensus, "lambdas"))
            return StreamingScheme(
                ties=ties_triple("ties_k", {"base", "lambdas", "k"}),
                consensus=(lambdas, kwargs.get("k", _default(consensus, "k"))),
            )
        raise SubboostError(f"consensus: base must be 'task_arithmetic' or 'ties', got {base!r}.")
    raise SubboostError(
        f"merge_from_checkpoints: no streaming scheme for method {method!r}. Streamable: "
        f"{sorted(LOCAL_METHODS | {'ties', 'dare', 'consensus'})}; a method that acts on each "
        "parameter (or matrix) alone can be declared with subboost.streaming.register_local_method."
    )


# ----------------------------------------------------------------------------
# Chunk kernels: jit over lists of leaves, so same-shaped chunks (the blocks
# of a transformer) share one compilation. Each mirrors, op for op, what the
# in-memory method computes on the same leaves.
# ----------------------------------------------------------------------------
@jax.jit
def _differences(stacked: list[jax.Array], base: list[jax.Array]) -> list[jax.Array]:
    return [x - b[None] for x, b in zip(stacked, base)]


@functools.partial(jax.jit, static_argnames=("p", "shape"))
def _keep_mask(key: jax.Array, *, p: float, shape: tuple[int, ...]) -> jax.Array:
    """DARE's mask of one leaf, as `subboost.merging.dare.drop_and_rescale` draws it.

    Compiled once per leaf shape and reused by every pass and every same-shaped chunk.
    """
    return jax.random.bernoulli(key, 1.0 - p, shape)


def _drop(tvs: list[jax.Array], masks: list[jax.Array] | None, p: float | None) -> list[jax.Array]:
    """`subboost.merging.dare.drop_and_rescale` given the leaves' keep masks."""
    if p is None:
        return tvs
    return [
        jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros_like(x)).astype(x.dtype)
        for x, keep in zip(tvs, masks)
    ]


@functools.partial(jax.jit, static_argnames=("p", "float_dtype"))
def _magnitude_bits(tvs, masks, *, p, float_dtype):
    """Bit patterns of ``|x|`` (as `kth_smallest_magnitude` forms them), after DARE's drop."""
    int_dtype = jnp.int64 if jnp.dtype(float_dtype) == jnp.float64 else jnp.int32
    return [jax.lax.bitcast_convert_type(jnp.abs(x.astype(float_dtype)), int_dtype) for x in _drop(tvs, masks, p)]


def _trim(tvs: list[jax.Array], thresholds: jax.Array | None, ties: tuple[float, str, str]) -> list[jax.Array]:
    """`subboost.merging.ties.trim` given the global per-task thresholds (or per leaf)."""
    from subboost.merging.ties import kth_smallest_magnitude, trim_rank

    k, _, scope = ties
    out = []
    for x in tvs:
        if scope == "per_leaf":
            kk = trim_rank(x[0].size, k)
            thr = kth_smallest_magnitude([x], kk) if kk >= 1 else jnp.zeros(x.shape[:1])
        elif thresholds is None:  # k = 1: nothing trimmed
            out.append(x)
            continue
        else:
            thr = thresholds
        thr = thr.reshape((-1,) + (1,) * (x.ndim - 1))
        keep = jnp.abs(x.astype(thr.dtype)) >= thr
        out.append(jnp.where(keep, x, jnp.zeros_like(x)))
    return out


def _raw_signs(trimmed: list[jax.Array]) -> list[jax.Array]:
    from subboost.linalg import compute_dtype

    return [jnp.sign(jnp.sum(x.astype(compute_dtype(x.dtype)), axis=0)) for x in trimmed]


@functools.partial(jax.jit, static_argnames=("scheme",))
def _sign_balance(tvs, masks, thresholds, *, scheme: StreamingScheme) -> jax.Array:
    """``#(+) - #(-)`` of the elected signs before ties are broken (an exact integer)."""
    trimmed = _trim(_drop(tvs, masks, scheme.drop_p), thresholds, scheme.ties)
    total = jnp.zeros((), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    for s in _raw_signs(trimmed):
        total = total + jnp.sum(s > 0, dtype=total.dtype) - jnp.sum(s < 0, dtype=total.dtype)
    return total


@functools.partial(jax.jit, static_argnames=("scheme",))
def _merge_elementwise(tvs, masks, thresholds, majority, *, scheme: StreamingScheme) -> list[jax.Array]:
    """DARE / TIES / Consensus-TIES on one chunk, given the global statistics."""
    from subboost.merging.averaging import expert_sum
    from subboost.merging.consensus import consensus_mask
    from subboost.merging.ties import disjoint_merge

    dropped = _drop(tvs, masks, scheme.drop_p)
    if scheme.ties is None:  # DARE + Task Arithmetic
        return [expert_sum(x) for x in dropped]
    trimmed = _trim(dropped, thresholds, scheme.ties)
    signs = [jnp.where(s == 0, majority, s) for s in _raw_signs(trimmed)]
    merged = disjoint_merge(trimmed, signs, merge=scheme.ties[1])
    if scheme.consensus is not None:
        lambdas, k = scheme.consensus
        mask = consensus_mask(tvs, lambdas=lambdas, k=k)
        merged = [jnp.where(m, t, jnp.zeros_like(t)) for m, t in zip(mask, merged)]
    return merged


# ----------------------------------------------------------------------------
# Reading chunks
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Inputs:
    base: CheckpointReader
    experts: list[CheckpointReader]
    chunks: list[list[str]]
    progress: bool
    keys: jax.Array | None = None  # DARE: split(key, num_leaves), one per leaf in tree order
    drop_p: float | None = None

    def __post_init__(self):
        self._leaf_index = {n: i for i, n in enumerate(self.base.specs)}

    def masks(self, names: list[str], tvs: list[jax.Array]) -> list[jax.Array] | None:
        """DARE's keep masks of a chunk (``None`` without DARE)."""
        if self.drop_p is None:
            return None
        return [_keep_mask(self.keys[self._leaf_index[n]], p=self.drop_p, shape=x.shape) for n, x in zip(names, tvs)]

    def stream(self, desc: str, *, check_finite: bool) -> Iterator[tuple[list[str], list[jax.Array], dict]]:
        """Yields ``(names, stacked task vectors, base arrays)`` chunk by chunk."""
        num = len(self.experts)
        for names in tqdm(self.chunks, desc=desc, disable=not self.progress, leave=False):
            base = self.base.read(names)
            if check_finite:
                _check_finite(base, self.base.source, "the base")
            stacked = {n: np.empty((num,) + base[n].shape, base[n].dtype) for n in names}
            for t, reader in enumerate(self.experts):
                arrays = reader.read(names)
                if check_finite:
                    _check_finite(arrays, reader.source, f"expert {t}")
                for n in names:
                    stacked[n][t] = arrays[n]
                del arrays
            tvs = _differences([stacked[n] for n in names], [base[n] for n in names])
            del stacked
            yield names, tvs, base


def _check_finite(arrays: Mapping[str, np.ndarray], source: str, what: str) -> None:
    for name, x in arrays.items():
        if not np.isfinite(x).all():
            raise SubboostError(f"{what} ({source}): parameter {name!r} contains NaN or infinite values.")


def _ties_float_dtype(specs: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
    dtype = jnp.result_type(*[jax.dtypes.canonicalize_dtype(s.dtype) for s in specs.values()])
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _radix_select(inputs: _Inputs, *, kk: int, scheme: StreamingScheme, float_dtype, passes: list) -> jax.Array:
    """Per task, the ``kk``-th smallest ``|x|`` over all parameters, 16 bits per read pass."""
    nbits = 64 if jnp.dtype(float_dtype) == jnp.float64 else 32
    uint = np.uint64 if nbits == 64 else np.uint32
    num = len(inputs.experts)
    prefix = np.zeros(num, np.uint64)
    rank = np.full(num, kk, np.int64)
    for digit in range(nbits // 16):
        shift = nbits - 16 * (digit + 1)
        hist = np.zeros((num, 1 << 16), np.int64)
        label = passes.pop(0)
        for names, tvs, _ in inputs.stream(label, check_finite=(digit == 0)):
            bits = _magnitude_bits(tvs, inputs.masks(names, tvs), p=scheme.drop_p, float_dtype=float_dtype)
            del tvs
            for b in bits:
                u = np.asarray(b).reshape(num, -1).view(uint)
                for t in range(num):
                    ut = u[t]
                    if digit:
                        ut = ut[(ut >> uint(shift + 16)) == uint(prefix[t])]
                    hist[t] += np.bincount(((ut >> uint(shift)) & uint(0xFFFF)).astype(np.intp), minlength=1 << 16)
        cumulative = np.cumsum(hist, axis=1)
        chosen = np.argmax(cumulative >= rank[:, None], axis=1)
        below = np.where(chosen > 0, cumulative[np.arange(num), np.maximum(chosen - 1, 0)], 0)
        rank = rank - below
        prefix = (prefix << np.uint64(16)) | chosen.astype(np.uint64)
    return jnp.asarray(prefix.astype(uint).view(np.float64 if nbits == 64 else np.float32))


# ----------------------------------------------------------------------------
# Output directory: staged, then renamed into place
# ----------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(out: Path) -> None:
    """Deletes partial directories of earlier runs for ``out`` whose process is gone."""
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


def _check_output(out: Path, *, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """``out`` must be free, or (with ``overwrite``) an output subboost wrote (`subboost.outputs`)."""
    from subboost.outputs import check_output

    check_output(out, inputs=[p for p in inputs if isinstance(p, (str, os.PathLike))], overwrite=overwrite,
                 name="out")


@contextlib.contextmanager
def _staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling directory that becomes ``out`` only if the block completes."""
    from subboost.outputs import make_parents, remove_created

    created = make_parents(out)  # removed again if the run fails
    _remove_dead_partials(out)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        (staging / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield staging
        (staging / OWNER_FILE).unlink()
        _fsync_dir(staging)
        if out.exists() or out.is_symlink():
            _check_output(out, overwrite=overwrite)  # again: something may have appeared meanwhile
            replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:12]}"
            os.rename(out, replaced)
            os.rename(staging, out)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staging, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        raise


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


# ----------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------
def _boost_options(boost: float | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``boost`` as complete `subspace_boost` keyword arguments (checked), or ``None``."""
    from subboost.boosting import check_boost_arguments, check_rank_arguments, subspace_boost
    from subboost.tree import ATTENTION_MODES

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
    from subboost.checkpoints import require_content

    if not Path(source).exists():
        raise FileNotFoundError(f"{what}: checkpoint {str(source)!r} does not exist.")
    return require_content(source, "params", what=what)


_SVD_METHODS = frozenset({"tsv", "iso_c", "iso_cts"})


def _require_matrices(specs: Mapping[str, jax.ShapeDtypeStruct], method: str, boost_options: Any) -> None:
    from subboost.tree import matrix_plan
    from subboost.validation import no_matrices_message

    tree = nest(dict(specs))
    users = [("subspace_boost", boost_options)] if boost_options is not None else []
    if method in _SVD_METHODS:
        users.append((method, {}))
    for what, options in users:
        is_matrix = options.get("is_matrix")
        if not matrix_plan(tree, is_matrix=is_matrix, attention=options.get("attention", "per_qkv")).members:
            raise SubboostError(no_matrices_message(tree, what=what, is_matrix=is_matrix))


def _check_method(method: str, kwargs: dict[str, Any], num_experts: int) -> StreamingScheme:
    from subboost.merging import _CHECKS, METHODS

    if method not in METHODS:
        raise SubboostError(f"unknown merge method {method!r}; known methods: {', '.join(METHODS)}.")
    accepted = inspect.signature(METHODS[method]).parameters
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted and not takes_var_kwargs]
    if unknown:
        valid = [k for k in accepted if k != "tvs"]
        raise SubboostError(f"{method}: unknown hyper-parameter(s) {unknown}; valid ones: {valid}.")
    if method in _CHECKS:
        _CHECKS[method](kwargs, num_experts)
    return streaming_scheme(method, kwargs)


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
    _check_output(out, overwrite=overwrite, inputs=[*expert_paths, base])
    method_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in method_kwargs.items()}
    scheme = _check_method(method, method_kwargs, len(expert_paths))
    boost_options = _boost_options(boost)

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
        check_same_parameters(base_reader, reader, what=f"expert {t}")
        if recorded is not None and base_identity["architecture"] not in (None, recorded):
            raise SubboostError(
                f"expert {t} ({reader.source}) records architecture {recorded}, but the base "
                f"({base_reader.source}) records {base_identity['architecture']}."
            )
        experts.append(reader)
    if boost_options is not None or method in _SVD_METHODS:  # whole-model check: a chunk may hold no matrix
        _require_matrices(base_reader.specs, method, boost_options)

    specs = base_reader.specs
    names = list(specs)
    out_specs = {n: (tuple(specs[n].shape), np.dtype(jax.dtypes.canonicalize_dtype(specs[n].dtype))) for n in names}
    inputs = _Inputs(
        base=base_reader,
        experts=experts,
        chunks=plan_chunks(specs, len(experts) + 1, chunk_bytes),
        progress=progress,
        keys=None if scheme.drop_p is None else jax.random.split(method_kwargs["key"], len(names)),
        drop_p=scheme.drop_p,
    )

    with _staged_output(out, overwrite=overwrite) as staging:
        thresholds, majority, passes = _global_statistics(inputs, scheme)
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
            "chunks": len(inputs.chunks),
            "read_passes": passes + 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        writer = SafetensorsWriter(
            staging / PARAMS_FILE, out_specs, metadata={"format": info["format"], "content": info["content"]}
        )
        checksums: dict[str, str] = {}
        try:
            label = f"pass {passes + 1}/{passes + 1}: merge" + (" + boost" if boost_options else "") + " + write"
            for chunk_names, tvs, base_arrays in inputs.stream(label, check_finite=passes == 0):
                result = _merge_chunk(chunk_names, tvs, base_arrays, inputs, scheme, thresholds, majority,
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
        info["checksums"] = {name: checksums[name] for name in names}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        (staging / COMPLETE_MARKER).write_text(info["created"] + "\n")
    return out


def _global_statistics(inputs: _Inputs, scheme: StreamingScheme) -> tuple[Any, Any, int]:
    """TIES's thresholds and tie-breaking sign (``None`` where not needed), and the passes taken."""
    from subboost.merging.ties import trim_rank

    if scheme.ties is None:
        return None, None, 0
    k, _, scope = scheme.ties
    specs = inputs.base.specs
    float_dtype = _ties_float_dtype(specs)
    thresholds = None
    labels = []
    if scope == "global":
        num_entries = sum(math.prod(s.shape) for s in specs.values())
        kk = trim_rank(num_entries, k)
        if kk >= 1:
            digits = (64 if jnp.dtype(float_dtype) == jnp.float64 else 32) // 16
            labels = [f"pass {i + 1}/{digits + 2}: TIES threshold, bits {16 * i}-{16 * i + 15}" for i in range(digits)]
            thresholds = _radix_select(
                inputs, kk=kk, scheme=scheme, float_dtype=float_dtype, passes=list(labels)
            )
    total_passes = len(labels) + 2
    balance = 0
    for names, tvs, _ in inputs.stream(f"pass {len(labels) + 1}/{total_passes}: TIES sign election",
                                       check_finite=not labels):
        balance += int(_sign_balance(tvs, inputs.masks(names, tvs), thresholds, scheme=scheme))
    majority_dtype = jnp.float64 if jnp.dtype(float_dtype) == jnp.float64 else jnp.float32
    majority = jnp.asarray(np.sign(balance), majority_dtype)
    return thresholds, majority, len(labels) + 1


def _merge_chunk(names, tvs, base_arrays, inputs, scheme, thresholds, majority, boost_options, alpha
                 ) -> dict[str, jax.Array]:
    from subboost.boosting import subspace_boost
    from subboost.merging import merge
    from subboost.task_vectors import apply_task_vector

    if scheme.local is not None:
        merged_tree = merge(nest(dict(zip(names, tvs))), scheme.local, validate=False, **dict(scheme.local_kwargs))
        merged = dict(leaves_with_paths(merged_tree))
    else:
        masks = inputs.masks(names, tvs)
        merged = dict(zip(names, _merge_elementwise(tvs, masks, thresholds, majority, scheme=scheme)))
    if boost_options is not None:  # per matrix: exact chunk by chunk
        merged = dict(leaves_with_paths(subspace_boost(nest(merged), **boost_options, validate=False)))
    if alpha is not None:
        params = apply_task_vector(nest({n: base_arrays[n] for n in names}), nest(merged), alpha)
        merged = dict(leaves_with_paths(params))
    return merged


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointReader",
    "LOCAL_METHODS",
    "OrbaxReader",
    "SafetensorsReader",
    "SafetensorsWriter",
    "StreamingScheme",
    "TreeReader",
    "check_same_parameters",
    "merge_from_checkpoints",
    "nest",
    "open_checkpoint",
    "plan_chunks",
    "read_params",
    "read_safetensors_header",
    "register_local_method",
    "save_safetensors",
    "streaming_scheme",
]
