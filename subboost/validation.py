"""Strict checks of hyper-parameters: real numbers, integers, intervals.

Python's ``True`` is an ``int`` and ``float("nan")`` compares false with every
bound, so ``isinstance(x, float) and 0 <= x <= 1`` lets ``beta=True`` through
and a test written as ``not (x < 0)`` lets NaN through. Every check here

* refuses ``bool`` wherever a number is expected,
* accepts Python and NumPy integers and floats (and 0-d arrays of them),
* refuses NaN and infinities always (no hyper-parameter takes them),

and raises `SubboostError` naming the hyper-parameter, the interval and the
value received.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from subboost.errors import SubboostError


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def _as_scalar(value: Any) -> Any:
    """NumPy scalars and 0-d (NumPy or concrete JAX) arrays as Python numbers; anything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__") and getattr(value, "ndim", None) == 0 and not isinstance(value, (bool, str)):
        try:
            return np.asarray(value).item()
        except Exception:  # a tracer: left as is, and refused as not a number
            return value
    return value


def check_real(
    name: str,
    value: Any,
    *,
    what: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float in the interval, else `SubboostError`.

    Args:
      name: the hyper-parameter's name (in the message).
      value: what the caller passed.
      what: the function or command it was passed to (message prefix).
      low, high: interval bounds (``None``: unbounded on that side).
      low_open, high_open: exclude the bound itself.
    """
    value = _as_scalar(value)
    interval = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SubboostError(f"{what}: {name} must be in {interval}, got {value!r} "
                            f"(a {type(value).__name__}, not a real number).")
    value = float(value)
    ok = not math.isnan(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    ok = ok and math.isfinite(value)  # no hyper-parameter takes an infinite value
    if not ok:
        wanted = "a finite number" if low is None and high is None else f"in {interval}"
        raise SubboostError(f"{what}: {name} must be {wanted}, got {value!r}.")
    return value


def check_int(name: str, value: Any, *, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else `SubboostError` (bools and floats refused)."""
    value = _as_scalar(value)
    interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SubboostError(f"{what}: {name} must be an integer in {interval}, got {value!r} "
                            f"({type(value).__name__}).")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise SubboostError(f"{what}: {name} must be an integer in {interval}, got {value!r}.")
    return value


def no_matrices_message(tree: Any, *, what: str, is_matrix: Any = None, lead_ndim: int = 0) -> str:
    """Why a tree has no matrix leaf, and what to pass: scan-stacked kernels need ``is_matrix=``."""
    from subboost.tree import leaves_with_paths

    leaves = leaves_with_paths(tree)
    shown = ", ".join(f"{p!r} {tuple(np.shape(x))[lead_ndim:]}" for p, x in leaves[:4])
    stacked = [p for p, x in leaves if p.split("/")[-1] == "kernel" and np.ndim(x) - lead_ndim >= 3]
    hint = (
        f" {stacked[0]!r} looks scan-stacked: pass is_matrix=subboost.tree.matrix_predicate(layer_axes=1)."
        if stacked else " Pass is_matrix= to say which leaves are matrices."
    )
    return (
        f"{what}: no parameter is a matrix under "
        f"{'the default predicate (2-D kernels, 3-D attention kernels)' if is_matrix is None else 'is_matrix'}; "
        f"leaves {shown}{', ...' if len(leaves) > 4 else ''}.{hint}"
    )


def check_choice(name: str, value: str, choices: tuple[str, ...], *, what: str) -> str:
    """``value`` if it is one of ``choices``, else `SubboostError` naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise SubboostError(f"{what}: {name} must be one of {choices}, got {value!r}.")
    return value


__all__ = ["check_choice", "check_int", "check_real", "no_matrices_message"]
