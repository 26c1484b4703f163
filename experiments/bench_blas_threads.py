"""Seconds per batched CPU SVD with the BLAS libraries' default threads vs `subboost.blas_threads.limited`.

The same jitted ``jnp.linalg.svd`` on the same inputs, the two settings interleaved run by run
in one process (so both see the same machine load); prints the median, min and max seconds of
each and the ratio of the medians. Shapes: one 384 x 384 matrix (all-MiniLM-L6-v2's attention
projections), a stack of six, and a 1536 x 384 MLP matrix.

    python -m experiments.bench_blas_threads                # 5 rounds
    python -m experiments.bench_blas_threads --rounds 9

Print the machine's load with the result (``uptime``): the effect depends on it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SHAPES = ((1, 384, 384), (6, 384, 384), (1, 1536, 384))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from subboost import blas_threads

    svd = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False))
    blas_threads.load_lapack()
    default_threads = [lib["num_threads"] for lib in blas_threads.blas_libraries()]
    print(f"BLAS libraries: {[lib['filepath'].rsplit('/', 1)[-1] for lib in blas_threads.blas_libraries()]}, "
          f"default threads {default_threads}; load average {os.getloadavg()[0]:.1f}")
    print("| shape | default threads: median (min-max) s | limited to 1: median (min-max) s | default / limited |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        jax.block_until_ready(svd(x))  # compile
        times: dict[str, list[float]] = {"default": [], "limited": []}
        for _ in range(args.rounds):
            for mode in ("default", "limited"):
                context = blas_threads.limited() if mode == "limited" else _null()
                with context:
                    start = time.perf_counter()
                    jax.block_until_ready(svd(x))
                    times[mode].append(time.perf_counter() - start)
        d, l = (np.array(times[m]) for m in ("default", "limited"))
        print(f"| {'x'.join(map(str, shape))} | {np.median(d):.3f} ({d.min():.3f}-{d.max():.3f}) | "
              f"{np.median(l):.3f} ({l.min():.3f}-{l.max():.3f}) | {np.median(d) / np.median(l):.1f}x |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
