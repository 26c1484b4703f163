"""Counting JAX traces through the public `jax.monitoring` hooks (no private jit cache counters)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # recorded once per traced (new) program


@contextlib.contextmanager
def count_traces() -> Iterator[list[str]]:
    """Within the block, the returned list gets one entry per program JAX traces (so 0 means all cache hits)."""
    traces: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == TRACE_EVENT:
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traces
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
