"""Chunks: groups of parameters read, from the base and every expert, at once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from subboost.checkpoint_io.huggingface import attention_block
from subboost.checkpoint_io.readers import CheckpointReader
from subboost.errors import SubboostError
from subboost.merging.dare import keep_mask as dare_keep_mask
from subboost.tree import ATTENTION_IN_NAMES

DEFAULT_CHUNK_BYTES = 256 * 2**20

# DARE's mask of one leaf, as `subboost.merging.dare.drop_and_rescale` draws it; compiled once
# per leaf shape and reused by every pass and every same-shaped chunk.
keep_mask = jax.jit(dare_keep_mask, static_argnames=("p", "shape"))


@jax.jit
def differences(stacked: list[jax.Array], base: list[jax.Array]) -> list[jax.Array]:
    """Task vectors ``theta_t - theta_0`` of a chunk (leading expert axis)."""
    return [x - b[None] for x, b in zip(stacked, base)]


def _unit_key(path: str) -> str:
    """Parameters that must share a chunk: q/k/v of one attention block (fused in ``attention="full"``)."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-2] in ATTENTION_IN_NAMES:
        return "/".join(parts[:-2]) + "/<qkv>"
    block = attention_block(path) if len(parts) == 1 else None  # a Hugging Face tensor name
    return path if block is None else block + ".<qkv>"


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


@dataclasses.dataclass
class ChunkStream:
    """Experts and their base read chunk by chunk, as stacked task vectors (DARE's masks drawn per leaf)."""


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
        return [keep_mask(self.keys[self._leaf_index[n]], p=self.drop_p, shape=x.shape) for n, x in zip(names, tvs)]

    def stream(self, desc: str, *, check_finite: bool) -> Iterator[tuple[list[str], list[jax.Array], dict]]:
        """Yields ``(names, stacked task vectors, base arrays)`` chunk by chunk."""
        num = len(self.experts)
        for names in tqdm(self.chunks, desc=desc, disable=not self.progress, leave=False):
            base = self.base.read(names)
            if check_finite:
                check_finite_arrays(base, self.base.source, "the base")
            stacked = {n: np.empty((num,) + base[n].shape, base[n].dtype) for n in names}
            for t, reader in enumerate(self.experts):
                arrays = reader.read(names)
                if check_finite:
                    check_finite_arrays(arrays, reader.source, f"expert {t}")
                for n in names:
                    stacked[n][t] = arrays[n]
                del arrays
            tvs = differences([stacked[n] for n in names], [base[n] for n in names])
            del stacked
            yield names, tvs, base


def check_finite_arrays(arrays: Mapping[str, np.ndarray], source: str, what: str) -> None:
    """`SubboostError` naming the file and parameter holding NaN or infinity."""
    for name, x in arrays.items():
        if not np.isfinite(x).all():
            raise SubboostError(f"{what} ({source}): parameter {name!r} contains NaN or infinite values.")


__all__ = ["ChunkStream", "DEFAULT_CHUNK_BYTES", "check_finite_arrays", "differences", "keep_mask", "plan_chunks"]
