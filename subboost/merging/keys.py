"""PRNG keys of randomised merge methods, drawn from a run's seed in one place.

A method that draws random numbers (DARE) takes a ``key`` hyper-parameter and
refuses to run without one: randomness is always explicit. Applications that
work from an integer seed (the command line, the benchmarks) add the key here,
for every method whose record accepts one, instead of naming the methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from subboost.merging.registry import method_record

__all__ = ["takes_key", "with_seed_key"]


def takes_key(method: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether ``method`` (with these hyper-parameters) accepts a PRNG ``key``."""
    return "key" in method_record(method).arguments(dict(kwargs or {}))


def with_seed_key(method: str, kwargs: Mapping[str, Any], *, seed: int) -> dict[str, Any]:
    """``kwargs`` plus ``key=jax.random.key(seed)`` when ``method`` takes a key and none is given.

    Example:
      >>> sorted(with_seed_key("dare", {"p": 0.9}, seed=0))
      ['key', 'p']
      >>> with_seed_key("ties", {"k": 0.2}, seed=0)
      {'k': 0.2}
    """
    kwargs = dict(kwargs)
    if kwargs.get("key") is None and takes_key(method, kwargs):
        kwargs["key"] = jax.random.key(seed)
    return kwargs
