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

import importlib
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

    directory = resolve_cache_dir(enabled=enabled)
    if directory is None:
        return None
    try:
        return enable_compile_cache(directory)
    except OSError as err:
        print(f"subboost: compilation cache off ({directory}: {err.strerror or err}); "
              f"set {ENV_VAR}=0 to silence this.", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------
# Smaller programs: elementwise merges of one flat vector instead of many leaves
# ----------------------------------------------------------------------------
# An elementwise merge of a tree with L leaves traces L copies of its arithmetic,
# and XLA's compile time grows with the program. TIES is the heavy one: its
# threshold bisection counts every leaf in each of its 32 steps. On the tiny
# benchmark model (40 leaves, T = 4) TIES compiled 13x faster on one (T, N) leaf;
# the concatenation and the 40 slices back cost about 2 s of compilation
# themselves, more than Task Arithmetic's or Consensus-TA's whole per-leaf program,
# so only the methods that run TIES are flattened. The merge of the concatenated
# leaves, split back, *is* the merge of the tree, entry for entry: every step is
# elementwise over parameters, sums over the expert axis, or (TIES's global
# threshold, its sign vote) an exact integer count over all parameters. The
# concatenation is a copy of the task vectors, so trees above `FLATTEN_MAX_BYTES`
# keep the per-leaf program (their compile time is paid back by their run time).
FLATTEN_MAX_BYTES = 1 << 26  # 64 MiB of stacked task vectors: where compile time, not run time, dominates


def _flattenable_methods() -> dict:
    from subboost.merging.consensus import consensus
    from subboost.merging.dare import dare
    from subboost.merging.ties import ties

    def global_ties(kwargs) -> bool:
        return kwargs.get("scope", "global") == "global"

    def on_global_ties(kwargs) -> bool:
        return kwargs.get("base", "task_arithmetic") == "ties" and global_ties(kwargs)

    return {ties: global_ties, consensus: on_global_ties, dare: on_global_ties}


def can_flatten(fn, tvs, kwargs: dict) -> bool:
    """Whether `flat_merge` of ``fn`` gives exactly ``fn(tvs, **kwargs)`` (and is worth it)."""
    import jax

    rule = _flattenable_methods().get(fn)
    if rule is None or not rule(kwargs):
        return False
    leaves = jax.tree_util.tree_leaves(tvs)
    if len(leaves) < 2 or any(getattr(x, "ndim", 0) < 1 for x in leaves):
        return False
    if len({x.dtype for x in leaves}) != 1 or len({x.shape[0] for x in leaves}) != 1:
        return False
    return sum(x.size * x.dtype.itemsize for x in leaves) <= FLATTEN_MAX_BYTES


def _dare_bases() -> dict:
    from subboost.merging.averaging import task_arithmetic
    from subboost.merging.ties import ties

    return {"task_arithmetic": task_arithmetic, "ties": ties}


def flat_merge(fn, tvs, **kwargs):
    """``fn`` applied to the leaves of ``tvs`` concatenated into one ``(T, N)`` leaf, split back into the tree.

    Traced inside the caller's `jax.jit`: the program holds the method's
    arithmetic once, plus one concatenation and one slice per leaf.
    """
    import jax
    import jax.numpy as jnp

    dare_module = importlib.import_module("subboost.merging.dare")
    if fn is dare_module.dare:  # DARE's masks are drawn per leaf (its random stream), its base merge flat
        tvs = dare_module.drop_and_rescale(tvs, key=kwargs.pop("key"), p=kwargs.pop("p", 0.9))
        fn = _dare_bases()[kwargs.pop("base", "task_arithmetic")]
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    num_tasks = leaves[0].shape[0]
    flat = jnp.concatenate([x.reshape(num_tasks, -1) for x in leaves], axis=1)
    merged = fn({"flat": flat}, **kwargs)["flat"]
    out, offset = [], 0
    for x in leaves:
        size = x[0].size
        out.append(merged[offset:offset + size].reshape(x.shape[1:]))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["ENV_VAR", "can_flatten", "default_cache_dir", "enable_compile_cache", "flat_merge", "resolve_cache_dir",
           "setup_cli_compile_cache"]
