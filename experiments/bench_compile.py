"""Compile time of the merges (issue 17): first call vs steady state, before vs after, cold vs warm cache.

Each cell is a fresh process (so no program is compiled in memory before its
first call), running every method at every task count T on random task vectors:

  * tree ``tiny``: the leaf shapes of `subboost demo --size tiny`'s ViT (40 leaves, 28k entries);
  * tree ``vitb16``: CLIP ViT-B/16 leaf shapes (`subboost.models.clip_vit`), ``--layers`` blocks.

Modes, side by side on the same inputs:

  * ``before``: the programs as compiled before issue 17 (one jitted program over
    the tree's leaves per T, DARE's masks drawn leaf by leaf, the finiteness check
    compiled per set of shapes, beta a compile-time constant of boosting);
  * ``after``: TIES (and DARE / Consensus on TIES) over one flat ``(T, N)`` leaf,
    DARE's masks in one draw, the task axis padded to buckets of 16 for TA, TIES,
    DARE and Consensus, small host trees checked by numpy, beta traced, and every
    program over at most 4 MiB of inputs compiled without LLVM optimisation
    (`subboost.quick_compile`).

and each mode twice on one fresh persistent compilation cache: ``cold`` (empty,
programs written) then ``warm`` (a second process, programs read back). Prints
first-call and steady-state seconds per (method, T) and the ratios. ``boost`` is
`sb.subspace_boost` of the Task Arithmetic vector (beta 0.01, one matrix per SVD call,
as the demo runs it); ``boost_sweep`` boosts it at the demo's 8 sweep betas.

    python -m experiments.bench_compile                          # tiny tree, T = 8, 14, 20
    python -m experiments.bench_compile --tree vitb16 --layers 1  # ViT-B/16 shapes, one block
    python -m experiments.bench_compile --demo                    # the issue's targets: two tiny demos

``--demo`` runs ``subboost demo --size tiny`` twice in fresh processes with an
empty compilation cache (models trained or taken from ``--models``), then again
with models and cache warm, and prints the merging phase and total times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("weight_averaging", "task_arithmetic", "ties", "dare", "consensus", "tsv", "iso_c", "iso_cts")
# Programs issue 17 changed with the benchmark's hyper-parameters (`DEFAULT_METHOD_KWARGS`): TIES flat,
# DARE's masks in one draw, TA / TIES / DARE / Consensus padded to task buckets, the sweep's beta traced.
# On the tiny tree every program also compiles quickly (`subboost.quick_compile`; the ViT-B/16 trees are larger).
CHANGED = frozenset({"task_arithmetic", "ties", "dare", "consensus", "boost_sweep"})


def tree_shapes(tree: str, layers: int):
    import jax

    from subboost.bench.suites.vision.config import get_config
    from subboost.bench.suites.vision.model import init_encoder
    from subboost.models.clip_vit import get_config as vit_config
    from subboost.models.clip_vit import param_shapes

    if tree == "tiny":
        return jax.eval_shape(lambda: init_encoder(get_config("tiny").model, jax.random.key(0)))
    return param_shapes(vit_config("ViT-B/16", layers=layers))


def use_before_programs() -> None:
    """The merge programs as they were before issue 17 (but for the expert sums, now added in expert order)."""
    import importlib

    import jax

    merging = importlib.import_module("subboost.merging")
    dare = importlib.import_module("subboost.merging.dare")
    merging.can_flatten = lambda method, tvs, kwargs: False
    merging.can_pad = lambda method, tvs, kwargs: False
    importlib.import_module("subboost.task_vectors").HOST_CHECK_MAX_BYTES = 0
    boosting = importlib.import_module("subboost.boosting")
    boosting.beta_can_be_traced = lambda tau, **kwargs: False
    dare.keep_masks = lambda keys, shapes, q: [jax.random.bernoulli(k, q, s) for k, s in zip(keys, shapes)]
    quick_compile = importlib.import_module("subboost.quick_compile")
    os.environ[quick_compile.ENV_VAR] = "0"  # every program fully optimised


def worker(args: argparse.Namespace) -> None:
    from subboost.compilation import enable_compile_cache

    if args.cache_dir:
        enable_compile_cache(args.cache_dir)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import subboost as sb
    from subboost.bench.settings import DEFAULT_METHOD_KWARGS, SVD_BATCH_SIZE
    from subboost.grids import BOOST_SWEEP_BETAS as SWEEP_BETAS

    if args.mode == "before":
        use_before_programs()
    shapes = tree_shapes(args.tree, args.layers)
    rows = []
    for num_tasks in args.tasks:
        rng = np.random.default_rng(num_tasks)
        tvs = jax.tree_util.tree_map(
            lambda s: jnp.asarray((0.01 * rng.standard_normal((num_tasks,) + tuple(s.shape))).astype(np.float32)),
            shapes)
        for method in args.methods:
            kwargs = dict(DEFAULT_METHOD_KWARGS.get(method, {}))
            if method == "dare":
                kwargs["key"] = jax.random.key(0)
            if method == "boost":
                tau = sb.merge(tvs, "task_arithmetic")
                call = lambda: sb.subspace_boost(tau, beta=0.01, batch_size=SVD_BATCH_SIZE)  # noqa: E731
            elif method == "boost_sweep":  # the demo's boosting-strength sweep: 8 betas
                tau = sb.merge(tvs, "task_arithmetic")
                call = lambda: [sb.subspace_boost(tau, beta=b, batch_size=SVD_BATCH_SIZE)  # noqa: E731
                                for b in SWEEP_BETAS]
            else:
                call = lambda: sb.merge(tvs, method, **kwargs)  # noqa: E731
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                jax.block_until_ready(call())
            except sb.SubboostError as err:  # e.g. TSV-M: T x rank exceeds a small matrix
                print(f"{method} at T = {num_tasks}: n/a ({err})", file=sys.stderr)
                continue
            first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            start = time.perf_counter()
            jax.block_until_ready(call())
            rows.append({"method": method, "T": num_tasks, "first": first, "first_cpu": first_cpu,
                         "again": time.perf_counter() - start})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


def run_worker(args: argparse.Namespace, mode: str, cache_dir: str) -> dict:
    command = [sys.executable, "-m", "experiments.bench_compile", "--worker", "--mode", mode, "--cache-dir", cache_dir,
               "--tree", args.tree, "--layers", str(args.layers), "--tasks", ",".join(map(str, args.tasks)),
               "--methods", ",".join(args.methods)]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - start
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall": wall, "cells": {(r["method"], r["T"]): r for r in rows}}


def compare(args: argparse.Namespace) -> None:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("before", "after"):
            cache = str(Path(tmp) / mode)
            for state in ("cold", "warm"):
                runs[mode, state] = run_worker(args, mode, cache)
                print(f"{mode:6s} {state}: process wall {runs[mode, state]['wall']:.1f} s", flush=True)
    load = os.getloadavg()
    print(f"\ntree {args.tree}" + (f" ({args.layers} ViT-B/16 blocks)" if args.tree == "vitb16" else "")
          + f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    print("\nFirst call: CPU seconds of the process (wall seconds); steady state: wall ms of the second call.")
    print("\n| method | T | first call, before, cold cache | after, cold cache | after, warm cache "
          "| before / after (CPU, cold) | steady state before / after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = {k: [0.0, 0.0] for k in runs}
    for (method, num_tasks) in runs["before", "cold"]["cells"]:
        if any((method, num_tasks) not in run["cells"] for run in runs.values()):
            continue
        cell = {k: run["cells"][method, num_tasks] for k, run in runs.items()}
        for k in runs:
            total[k][0] += cell[k]["first_cpu"]
            total[k][1] += cell[k]["first"]
        b, a, w = cell["before", "cold"], cell["after", "cold"], cell["after", "warm"]
        mark = "" if method in CHANGED or args.tree == "tiny" else " (same program)"
        print(f"| {method}{mark} | {num_tasks} | {b['first_cpu']:.2f} s ({b['first']:.2f}) "
              f"| {a['first_cpu']:.2f} s ({a['first']:.2f}) | {w['first_cpu']:.2f} s ({w['first']:.2f}) "
              f"| {b['first_cpu'] / max(a['first_cpu'], 1e-3):.1f}x "
              f"| {b['again'] * 1e3:.0f} / {a['again'] * 1e3:.0f} ms |")
    (bc, bw), (ac, aw), (wc, ww) = total["before", "cold"], total["after", "cold"], total["after", "warm"]
    print(f"| **all first calls** | | {bc:.1f} s ({bw:.1f}) | {ac:.1f} s ({aw:.1f}) | {wc:.1f} s ({ww:.1f}) "
          f"| {bc / ac:.1f}x | |")
    total = {k: v[0] for k, v in total.items()}
    print(f"\nbefore with a warm cache: all first calls {total['before', 'warm']:.1f} CPU s")


def demo(args: argparse.Namespace) -> None:
    """The issue's targets: the tiny demo from a cold compilation cache, then with models and cache warm."""
    out_root = Path(tempfile.mkdtemp(prefix="bench_compile_demo_"))
    cache = out_root / "jax-cache"
    models = Path(args.models) if args.models else out_root / "models"
    env = {**os.environ, "SUBBOOST_COMPILE_CACHE": str(cache)}
    for run in ("cold cache", "warm cache"):
        out = out_root / run.replace(" ", "_")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "subboost.cli", "demo", "--size", "tiny", "--out", str(out),
                        "--cache-dir", str(models), "--no-progress"], check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        timings = json.loads((out / "results.json").read_text())["timings"]
        merging = sum(v for k, v in timings.items() if k.startswith("merge_"))
        print(f"tiny demo, {run}: merging phase {merging:.1f} s, whole demo {wall:.1f} s wall "
              f"(timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})})", flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores; outputs in {out_root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", choices=("tiny", "vitb16"), default="tiny")
    parser.add_argument("--layers", type=int, default=1, help="ViT-B/16 blocks (--tree vitb16)")
    parser.add_argument("--tasks", default="8,14,20", help="task counts T")
    parser.add_argument("--methods", default=",".join(METHODS + ("boost", "boost_sweep")))
    parser.add_argument("--demo", action="store_true", help="time two tiny demos instead (the issue's targets)")
    parser.add_argument("--models", default=None, help="--demo: trained-model cache to reuse (default: train once)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("before", "after"), default="after", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tasks = [int(t) for t in args.tasks.split(",")]
    args.methods = args.methods.split(",")
    if args.demo:
        demo(args)
    elif args.worker:
        worker(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
