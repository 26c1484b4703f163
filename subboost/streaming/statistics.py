"""TIES's global statistics, accumulated over read passes before the merging pass.

* The per-task threshold ``v_t``, the ``kk``-th smallest ``|tau_t|`` over the whole task
  vector, by radix select on bit patterns (`radix_select`): 16 bits per pass, bit-for-bit
  the value `subboost.merging.ties.kth_smallest_magnitude` finds by bisection in memory.
* The tie-breaking sign, ``sign(sum(sign(sum_t trimmed_t)))`` over all parameters, counted
  exactly in integers (`subboost.streaming.kernels.sign_balance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.merging.registry import StreamingScheme
from subboost.merging.ties import trim_rank
from subboost.streaming.chunks import ChunkStream
from subboost.streaming.kernels import magnitude_bits, sign_balance


def ties_float_dtype(specs: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
    dtype = jnp.result_type(*[jax.dtypes.canonicalize_dtype(s.dtype) for s in specs.values()])
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def radix_select(inputs: ChunkStream, *, kk: int, scheme: StreamingScheme, float_dtype, passes: list,
                 combine: Callable[[np.ndarray], np.ndarray] | None = None) -> jax.Array:
    """Per task, the ``kk``-th smallest ``|x|`` over all parameters, 16 bits per read pass.

    ``combine`` sums a pass's integer histograms over processes that each streamed a
    share of the parameters (`subboost.streaming.pod`); ``None``: one process read all.
    """
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
            bits = magnitude_bits(tvs, inputs.masks(names, tvs), p=scheme.drop_p, float_dtype=float_dtype)
            del tvs
            for b in bits:
                u = np.asarray(b).reshape(num, -1).view(uint)
                for t in range(num):
                    ut = u[t]
                    if digit:
                        ut = ut[(ut >> uint(shift + 16)) == uint(prefix[t])]
                    hist[t] += np.bincount(((ut >> uint(shift)) & uint(0xFFFF)).astype(np.intp), minlength=1 << 16)
        if combine is not None:
            hist = combine(hist)
        cumulative = np.cumsum(hist, axis=1)
        chosen = np.argmax(cumulative >= rank[:, None], axis=1)
        below = np.where(chosen > 0, cumulative[np.arange(num), np.maximum(chosen - 1, 0)], 0)
        rank = rank - below
        prefix = (prefix << np.uint64(16)) | chosen.astype(np.uint64)
    return jnp.asarray(prefix.astype(uint).view(np.float64 if nbits == 64 else np.float32))


def global_statistics(inputs: ChunkStream, scheme: StreamingScheme, *,
                      combine: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[Any, Any, int]:
    """TIES's thresholds and tie-breaking sign (``None`` where not needed), and the passes taken.

    ``combine``: sums integer statistics over processes (see `radix_select`).
    """
    if scheme.ties is None:
        return None, None, 0
    k, _, scope = scheme.ties
    specs = inputs.base.specs
    float_dtype = ties_float_dtype(specs)
    thresholds = None
    labels = []
    if scope == "global":
        num_entries = sum(math.prod(s.shape) for s in specs.values())
        kk = trim_rank(num_entries, k)
        if kk >= 1:
            digits = (64 if jnp.dtype(float_dtype) == jnp.float64 else 32) // 16
            labels = [f"pass {i + 1}/{digits + 2}: TIES threshold, bits {16 * i}-{16 * i + 15}" for i in range(digits)]
            thresholds = radix_select(
                inputs, kk=kk, scheme=scheme, float_dtype=float_dtype, passes=list(labels), combine=combine
            )
    total_passes = len(labels) + 2
    balance = 0
    for names, tvs, _ in inputs.stream(f"pass {len(labels) + 1}/{total_passes}: TIES sign election",
                                       check_finite=not labels):
        balance += int(sign_balance(tvs, inputs.masks(names, tvs), thresholds, scheme=scheme))
    if combine is not None:
        balance = int(combine(np.asarray([balance], np.int64))[0])
    majority_dtype = jnp.float64 if jnp.dtype(float_dtype) == jnp.float64 else jnp.float32
    majority = jnp.asarray(np.sign(balance), majority_dtype)
    return thresholds, majority, len(labels) + 1


__all__ = ["global_statistics", "radix_select", "ties_float_dtype"]
