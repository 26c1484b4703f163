"""One BLAS thread under the LAPACK calls of XLA's CPU backend (and host numpy), set in code.

Why: on CPU, jaxlib's SVD / QR / eigh kernels call LAPACK from scipy's bundled OpenBLAS, and
numpy calls its own OpenBLAS. Both start one thread per core by default. Inside a jitted
program XLA already spreads a batched decomposition over its own intra-op thread pool, so each
LAPACK call then forks and joins OpenBLAS threads on cores that XLA's threads occupy. A
blocked ``gesdd`` of a 384 x 384 matrix synchronises its threads hundreds of times (one
fork-join per panel update); when the machine is busy, a waiting OpenBLAS thread is not
scheduled for a full time slice at every join. Measured on 2 cores shared with other jobs
(experiments/bench_blas_threads.py): seconds per such SVD with two BLAS threads, tens of
milliseconds with one. ``OPENBLAS_NUM_THREADS=1`` fixed it, but only when set before the
libraries load; `limited` sets the same limit at run time through threadpoolctl.

`limited` is a context manager (the command line wraps every subcommand in it). Library
users who call decompositions in a busy process can do the same::

    with subboost.blas_threads.limited():
        merged = sb.merge(task_vectors, method="tsv")
        jax.block_until_ready(merged)   # dispatch is asynchronous: finish inside the block
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from subboost.errors import SubboostError

# BLAS threads inside `limited`: one, since XLA parallelises over the batch of matrices itself.
DEFAULT_THREADS = 1


def blas_libraries() -> list[dict[str, Any]]:
    """The BLAS libraries loaded in this process (threadpoolctl's ``threadpool_info``, BLAS entries only)."""
    from threadpoolctl import threadpool_info

    return [info for info in threadpool_info() if info.get("user_api") == "blas"]


@contextlib.contextmanager
def limited(threads: int = DEFAULT_THREADS) -> Iterator[None]:
    """Every loaded BLAS library (scipy's OpenBLAS, which XLA's CPU LAPACK kernels use, and numpy's)
    runs on at most ``threads`` threads inside the block; the previous limits come back after it.

    Loads jax's LAPACK kernels first (a tiny CPU SVD): libraries loaded after the limit is set
    would not be limited. A no-op where threadpoolctl is missing.
    """
    if threads < 1:
        raise SubboostError(f"limited: threads must be at least 1, got {threads}.")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay usable without it
        yield
        return
    load_lapack()
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def load_lapack() -> None:
    """Makes jaxlib load its CPU LAPACK (scipy's OpenBLAS) so that threadpoolctl can see it."""
    import jax
    import numpy as np

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # pragma: no cover - no CPU backend
        return
    eye = jax.device_put(np.eye(2, dtype=np.float32), cpu)
    jax.block_until_ready(jax.numpy.linalg.svd(eye, compute_uv=False))
