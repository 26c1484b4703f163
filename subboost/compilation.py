"""Compile once: JAX's persistent compilation cache for the command line.

XLA compilation, not arithmetic, dominates interactive merges of small models:
every new process compiles every program again. JAX can keep compiled programs
on disk (`jax_compilation_cache_dir`) and reload them in the next process. The
``subboost`` command line (`subboost.cli`) turns that cache on by default, in a
per-user directory; importing the library never changes JAX's global config
(call `enable_compile_cache` yourself in a notebook or script).

Where the cache goes, in order:

1. ``subboost --no-compile-cache ...``: off.
2. ``SUBBOOST_COMPILE_CACHE``: ``0`` / ``off`` / ``false`` / ``no`` turns it off,
   ``1`` / ``on`` / ``true`` / ``yes`` / empty uses the default directory, anything
   else is the cache directory.
3. The default: ``$XDG_CACHE_HOME/subboost/jax`` (``~/.cache/subboost/jax``).

Every program is cached, however small or fast to compile: JAX's own defaults
skip programs compiled in under a second, which are most of a merge's.
The cache is trusted code: never point it at a directory others can write to.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SUBBOOST_COMPILE_CACHE"
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
    value = (os.environ if environ is None else environ).get(ENV_VAR)
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
    import jax

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
        print(f"subboost: compilation cache off ({ENV_VAR}={os.environ.get(ENV_VAR, '')!r}: {err}); "
              f"set {ENV_VAR}=0 to silence this.", file=sys.stderr)
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
              f"set {ENV_VAR}=0 to silence this.", file=sys.stderr)
        return None


__all__ = ["ENV_VAR", "default_cache_dir", "enable_compile_cache", "resolve_cache_dir", "setup_cli_compile_cache"]
