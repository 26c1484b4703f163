"""LoRA merging, factored vs dense, side by side: time and XLA's peak memory per module group.

For each width d (square d x d modules, G of them), T adapters of rank r and each
method, two jit-compiled programs get the same random factors ``B (G, d, T r)``
and ``A (G, T r, d)``:

* factored: `subboost.lora.factored.merge_group` (QRs of the stacked factors,
  SVDs of (T r) x (T r) cores), returning ``(Q_B, M, Q_A)``;
* dense: forms the T updates ``B_t A_t`` (G, T, d, d) and runs subboost's dense
  matrix kernel (TSV-M, Iso-C, Iso-CTS; TA = sum then Subspace Boosting), as
  `subboost.merge` does on a task-vector tree.

Memory is XLA's compiled footprint (arguments + outputs + temporaries, from
``memory_analysis()``, no run needed); time the median of ``--repeats`` runs
after a warm-up. Ratios are dense / factored, measured in one process.

    nice -n 10 python -m experiments.bench_lora --widths 768 --tasks 8 20
    nice -n 10 python -m experiments.bench_lora --widths 4096 --tasks 8 20 --no-dense-time
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from subboost.boosting import boost_matrices
from subboost.lora.factored import merge_group
from subboost.merging.iso import iso_c_matrices, iso_cts_matrices
from subboost.merging.tsv import tsv_matrices

MIB = 1024**2
METHODS = ("task_arithmetic+boost", "tsv", "iso_c", "iso_cts")


def dense_program(method: str, tasks: int, rank: int):
    """``(b, a) -> merged (G, d, d)`` through the dense kernels."""

    def run(b, a):
        g, d, _ = b.shape
        updates = jnp.einsum("gitr,gtrj->gtij", b.reshape(g, d, tasks, rank), a.reshape(g, tasks, rank, -1))
        if method == "task_arithmetic+boost":
            return boost_matrices(jnp.sum(updates, axis=1), beta=0.01)
        kernel = {"tsv": tsv_matrices, "iso_c": iso_c_matrices, "iso_cts": iso_cts_matrices}[method]
        return kernel(updates)

    return jax.jit(run)


def factored_program(method: str, tasks: int, rank: int, width: int):
    name, beta = ("task_arithmetic", 0.01) if method == "task_arithmetic+boost" else (method, None)
    return jax.jit(functools.partial(merge_group, ranks=(rank,) * tasks, shape=(width, width), method=name,
                                     beta=beta, rank_rtol=1e-6 if beta is not None else None))


def footprint(program, *args) -> float:
    analysis = program.lower(*args).compile().memory_analysis()
    total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    return total / MIB


def seconds(program, *args, repeats: int) -> float:
    jax.block_until_ready(program(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[768, 4096])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modules", type=int, default=1, help="same-shaped modules per group (G)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dense-time", action="store_true",
                        help="dense path: memory from shapes only (its d x d SVDs take minutes on CPU)")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, r = {args.rank}, G = {args.modules}")
    print("| d | T | method | factored s | dense s | time ratio | factored MiB | dense MiB | memory ratio |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for width in args.widths:
        for tasks in args.tasks:
            kb, ka = jax.random.split(jax.random.key(width + tasks))
            total = tasks * args.rank
            b = 0.05 * jax.random.normal(kb, (args.modules, width, total))
            a = 0.05 * jax.random.normal(ka, (args.modules, total, width))
            for method in args.methods:
                factored = factored_program(method, tasks, args.rank, width)
                dense = dense_program(method, tasks, args.rank)
                mem_f, mem_d = footprint(factored, b, a), footprint(dense, b, a)
                time_f = seconds(factored, b, a, repeats=args.repeats)
                time_d = float("nan") if args.no_dense_time else seconds(dense, b, a, repeats=args.repeats)
                print(f"| {width} | {tasks} | {method} | {time_f:.4f} | {time_d:.3f} | {time_d / time_f:.1f} | "
                      f"{mem_f:.1f} | {mem_d:.1f} | {mem_d / mem_f:.1f} |", flush=True)


if __name__ == "__main__":
    main()
