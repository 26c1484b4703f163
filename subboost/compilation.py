"""Compiling fast on the CPU: the persistent compilation cache, and quick programs for small inputs.

XLA compilation, not arithmetic, dominates interactive merges of small
models. Two remedies live here.

Persistent cache
----------------
Every new process compiles every program again. JAX can keep compiled programs
on disk (`jax_compilation_cache_dir`) and reload them in the next process. The
``subboost`` command line (`subboost.cli`) turns that cache on by default, in a
per-user directory; importing the library never changes JAX's global config
(call `enable_compile_cache` yourself in a notebook or script).

Where the cache goes, in order:

1. ``subboost --no-compile-cache ...``: off.
2. ``SUBBOOST_COMPILE_CACHE`` (`CACHE_ENV_VAR`): ``0`` / ``off`` / ``false`` / ``no`` turns it off,
   ``1`` / ``on`` / ``true`` / ``yes`` / empty uses the default directory, anything
   else is the cache directory.
3. The default: ``$XDG_CACHE_HOME/subboost/jax`` (``~/.cache/subboost/jax``).

Every program is cached, however small or fast to compile: JAX's own defaults
skip programs compiled in under a second, which are most of a merge's.
The cache is trusted code: never point it at a directory others can write to.

Quick programs for small inputs
-------------------------------
On the CPU most of a small merge's first call is XLA compiling it, and most of
that is LLVM optimising the generated kernels (measured on eight random
32 x 32..39 matrices at T = 4: TSV-M 2.4 -> 0.75 s, Iso-CTS 4.7 -> 1.4 s, TIES
2.7 -> 1.1 s with ``xla_backend_optimization_level=0``). A merge runs once; its kernels
over a few MiB take milliseconds either way. So `size_aware_jit` keeps two
`jax.jit` programs of one function and picks by input size:

* every array argument together at most `quick_compile_max_bytes` (default 4 MiB), on the
  CPU backend: the quick program (`QUICK_COMPILER_OPTIONS`);
* larger inputs, other backends, or a call inside the caller's own trace
  (tracers; the caller's program decides): the fully optimised one.

The quick program runs slower: TIES on the tiny benchmark's tree at T = 8
(1.8 MB padded) takes 62 ms instead of 8 ms a call, about 30 ms more per MB.
Compilation saves 1-2 s, so at the 4 MiB limit a merge repeated about ten
times breaks even; larger inputs are always fully optimised.

The LLVM optimisation level changes no floating-point result: XLA does not
allow fast-math rewrites on the CPU, and the LAPACK / Eigen kernels are
precompiled. The merges, boosting and task vectors of the tiny benchmark are
equal bit for bit at both levels, and `tests/test_quick_compile.py` checks
every method on random inputs with `np.array_equal`.

``SUBBOOST_QUICK_COMPILE_MAX_BYTES`` (`QUICK_COMPILE_ENV_VAR`) sets the size
limit in bytes; ``0`` turns quick compilation off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax

from subboost.errors import SubboostError

CACHE_ENV_VAR = "SUBBOOST_COMPILE_CACHE"
QUICK_COMPILE_ENV_VAR = "SUBBOOST_QUICK_COMPILE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 20
QUICK_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------
# The persistent compilation cache
# ----------------------------------------------------------------------------
_OFF = frozenset({"0", "off", "false", "no"})
_ON = frozenset({"", "1", "on", "true", "yes"})


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/subboost/jax``, or ``~/.cache/subboost/jax`` when that variable is unset."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "subboost" / "jax"


def resolve_cache_dir(*, enabled: bool = True, environ: dict[str, str] | None = None) -> Path | None:
    """The cache directory the command line uses, or ``None`` when the cache is off.

    Args:
      enabled: ``False`` for ``--no-compile-cache`` (wins over the environment).
      environ: the environment to read ``SUBBOOST_COMPILE_CACHE`` from (default `os.environ`).
    """
    if not enabled:
        return None
    value = (os.environ if environ is None else environ).get(CACHE_ENV_VAR)
    if value is None or value.strip().lower() in _ON:
        return default_cache_dir()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in ``path`` (default `default_cache_dir`).

    Call it before the first compilation of the process (JAX opens the cache
    once). Programs of every size and compile time are written, so a second
    process running the same merges compiles nothing new.

    Returns:
      The cache directory (created if missing).
    """
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


def setup_cli_compile_cache(*, enabled: bool = True) -> Path | None:
    """What the command line does at start-up: `resolve_cache_dir`, then `enable_compile_cache`.

    A cache directory that cannot be created is reported on stderr and the run
    goes on without a cache (compiling is slower, never wrong).
    """
    import sys

    import tempfile

    try:
        directory = resolve_cache_dir(enabled=enabled)
    except RuntimeError as err:  # "~nosuchuser"
        print(f"subboost: compilation cache off ({CACHE_ENV_VAR}={os.environ.get(CACHE_ENV_VAR, '')!r}: {err}); "
              f"set {CACHE_ENV_VAR}=0 to silence this.", file=sys.stderr)
        return None
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # JAX warns on every program it cannot write: a read-only directory is refused here, in one line.
        with tempfile.TemporaryFile(dir=directory):
            pass
        return enable_compile_cache(directory)
    except OSError as err:
        print(f"subboost: compilation cache off ({directory}: {err.strerror or err}); "
              f"set {CACHE_ENV_VAR}=0 to silence this.", file=sys.stderr)
        return None



# ----------------------------------------------------------------------------
# Quick programs for small CPU inputs
# ----------------------------------------------------------------------------
def quick_compile_max_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The input-size limit for quick compilation: ``SUBBOOST_QUICK_COMPILE_MAX_BYTES`` or 4 MiB."""
    value = (os.environ if environ is None else environ).get(QUICK_COMPILE_ENV_VAR)
    if value is None or not value.strip():
        return DEFAULT_MAX_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise SubboostError(f"{QUICK_COMPILE_ENV_VAR} must be a whole number of bytes (0 turns quick compilation "
                            f"off), got {value!r}.") from None
    if limit < 0:
        raise SubboostError(f"{QUICK_COMPILE_ENV_VAR} must be >= 0, got {limit}.")
    return limit


def input_bytes(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """Total bytes of the array leaves of ``(args, kwargs)``; ``None`` if any leaf is a tracer."""
    total = 0
    for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        if isinstance(leaf, jax.core.Tracer):
            return None
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue  # a key's few words; its `nbytes` is not defined for every implementation
        total += int(getattr(leaf, "nbytes", 0) or 0)
    return total


def is_quick(args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """Whether a call with these arguments compiles without LLVM optimisation (see the module docstring)."""
    limit = quick_compile_max_bytes()
    if limit == 0 or jax.default_backend() != "cpu":
        return False
    size = input_bytes(args, kwargs)
    return size is not None and size <= limit


class SizeAwareJit:
    """``jax.jit(fn, **jit_kwargs)`` twice: optimised, and quick for small CPU inputs (`is_quick`).

    Calls, `lower` and `trace` go to the program `is_quick` picks; ``optimized``
    and ``quick`` are the two `jax.jit` objects.
    """

    def __init__(self, fn: Callable, **jit_kwargs: Any):
        if "compiler_options" in jit_kwargs:
            raise SubboostError("size_aware_jit sets compiler_options itself; use jax.jit for your own options.")
        self.optimized = jax.jit(fn, **jit_kwargs)
        self.quick = jax.jit(fn, compiler_options=QUICK_COMPILER_OPTIONS, **jit_kwargs)
        functools.update_wrapper(self, fn)

    def program(self, *args: Any, **kwargs: Any):
        """The `jax.jit` object a call with these arguments runs."""
        return self.quick if is_quick(args, kwargs) else self.optimized

    def __call__(self, *args: Any, **kwargs: Any):
        return self.program(*args, **kwargs)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any):
        return self.program(*args, **kwargs).lower(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any):
        return self.program(*args, **kwargs).trace(*args, **kwargs)


def size_aware_jit(fn: Callable | None = None, **jit_kwargs: Any):
    """`SizeAwareJit` of ``fn``; without ``fn``, a decorator (``@size_aware_jit(static_argnames=...)``)."""
    if fn is None:
        return functools.partial(size_aware_jit, **jit_kwargs)
    return SizeAwareJit(fn, **jit_kwargs)



__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_MAX_BYTES",
    "QUICK_COMPILER_OPTIONS",
    "QUICK_COMPILE_ENV_VAR",
    "SizeAwareJit",
    "default_cache_dir",
    "enable_compile_cache",
    "input_bytes",
    "is_quick",
    "quick_compile_max_bytes",
    "resolve_cache_dir",
    "setup_cli_compile_cache",
    "size_aware_jit",
]
