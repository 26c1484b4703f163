"""Pod scale on one machine: per-process bytes read and peak RSS for P = 1, 2, 4 local processes.

Writes 8 random, seeded experts and their base shaped like a CLIP ViT-B/16 visual tower
(12 blocks, width 768; 86M parameters, 0.34 GB each in float32) to ``--workdir`` (with
`experiments.bench_memory.generate`), then runs the same call,

    sb.merge_from_checkpoints(base, experts, method="ties", k=0.2, boost=0.01, out=out)

in P processes at once (`experiments/pod_worker.py`; P = 1: one ordinary process; P > 1:
`jax.distributed` from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, gloo collectives, ``--devices`` CPU devices each). Per process it reports the tensor bytes read (recorded in
``merge_info.json``; for P = 1 every tensor once per read pass), the bytes its ``read``
system calls returned (``rchar`` of ``/proc/self/io``: imports included) and its peak RSS,
each as a ratio to P = 1, and the largest difference of the P-process result from the
one-process result.

    python -m experiments.bench_pod                      # 8 x ViT-B/16, P = 1, 2, 4 (3.1 GB on disk)
    python -m experiments.bench_pod --check              # every method and boosting, P = 2 and 4 vs 1, tiny tree
    python -m experiments.bench_pod --layers 1 --width 64 --mlp 256 --heads 4 --experts 3   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.bench_memory import generate, max_difference, vit_shapes
from subboost.commands.merge import parse_param

ROOT = Path(__file__).parents[1]

CHECKS = [  # every streamable method with its settings (--check), and boosting
    ("weight_averaging", {}, None), ("task_arithmetic", {}, None), ("ties", {"k": 0.3}, None),
    ("ties", {"k": 0.5, "merge": "sum", "scope": "per_leaf"}, None), ("dare", {"p": 0.5, "key": 1}, None),
    ("dare", {"p": 0.5, "base": "ties", "k": 0.3, "key": 1}, None), ("consensus", {"lambdas": 0.5}, None),
    ("consensus", {"base": "ties", "k": 0.4, "lambdas": 0.4, "min_tasks": 1}, None),
    ("tsv", {}, None), ("iso_c", {}, None), ("iso_cts", {}, None),
    ("task_arithmetic", {}, 0.02), ("ties", {"k": 0.3}, 0.02), ("tsv", {}, 0.02),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(processes: int, jobs: list[dict], *, devices: int) -> tuple[list[list[dict]], float]:
    """``jobs`` on ``processes`` local processes at once (`experiments/pod_worker.py`); reports and wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": str(processes),
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "experiments" / "pod_worker.py"), json.dumps(jobs)],
                              env={**env, "JAX_PROCESS_ID": str(p)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(processes)]
    reports = []
    for p, proc in enumerate(procs):
        stdout, stderr = proc.communicate()
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or any(r["error"] for r in lines):
            raise RuntimeError(f"process {p} of {processes} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
        reports.append(lines)
    return reports, time.perf_counter() - start


def tensor_bytes_read(out: Path, processes: int, total_bytes: int) -> list[int]:
    """Per process: tensor bytes read (recorded by a P-process merge; one process reads all, once per pass)."""
    info = json.loads((out / "merge_info.json").read_text())
    if processes == 1:
        return [total_bytes * info["read_passes"]]
    return info["bytes_read"]


def check(args: argparse.Namespace) -> None:
    """Every method (and boosting) on 2 and 4 processes against one process: the largest difference."""
    shapes = vit_shapes(2, 32, 64, 4, patch=8, image=32, embed=16)
    base, experts = generate(args.workdir, shapes, 3, args.seed)
    jobs = {p: [] for p in (1, 2, 4)}
    for i, (method, kwargs, boost) in enumerate(CHECKS):
        for p in jobs:
            jobs[p].append({"base": str(base), "experts": [str(e) for e in experts], "method": method,
                            "kwargs": kwargs, "boost": boost, "out": str(args.workdir / f"{i}_{method}_p{p}"),
                            "chunk_bytes": 20_000})
    for p in jobs:
        run_processes(p, jobs[p], devices=args.devices)
    print("| method | settings | boost | max abs diff, P = 2 vs 1 | P = 4 vs 1 |\n|---|---|---|---:|---:|")
    for i, (method, kwargs, boost) in enumerate(CHECKS):
        diffs = [max_difference(jobs[1][i]["out"], jobs[p][i]["out"]) for p in (2, 4)]
        settings = " ".join(f"{k}={v}" for k, v in kwargs.items()) or "-"
        print(f"| {method} | {settings} | {boost or '-'} | {diffs[0]:.1e} | {diffs[1]:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12, help="ViT-B/16 has 12")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--param", action="append", default=None, help="merge hyper-parameter (default k=0.2 for TIES)")
    parser.add_argument("--beta", type=float, default=0.01, help="Subspace Boosting beta (negative: no boosting)")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--check", action="store_true", help="equality of every method on 2 and 4 processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a fresh directory under $TMPDIR")
    parser.add_argument("--keep", action="store_true", help="keep the generated experts and results")
    args = parser.parse_args()
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="subboost_bench_pod_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.check:
            check(args)
            return
        shapes = vit_shapes(args.layers, args.width, args.mlp, args.heads, patch=16, embed=512)
        model_bytes = sum(math.prod(s) for s in shapes.values()) * 4
        total = model_bytes * (args.experts + 1)
        print(f"{args.experts} experts x {args.layers} blocks (width {args.width}): {model_bytes / 2**30:.2f} GB "
              f"per model, {total / 2**30:.2f} GB in {args.workdir}")
        base, experts = generate(args.workdir, shapes, args.experts, args.seed)
        kwargs = dict(parse_param(p) for p in (args.param or (["k=0.2"] if args.method == "ties" else [])))
        job = {"base": str(base), "experts": [str(e) for e in experts], "method": args.method, "kwargs": kwargs,
               "boost": args.beta if args.beta >= 0 else None}
        rows = []
        for processes in [int(p) for p in args.processes.split(",")]:
            out = args.workdir / f"merged_p{processes}"
            reports, wall = run_processes(processes, [{**job, "out": str(out)}], devices=args.devices)
            tensors = tensor_bytes_read(out, processes, total)
            rows.append({"processes": processes, "wall_s": wall, "tensor_bytes": max(tensors),
                         "rchar": max(r[0]["rchar"] for r in reports),
                         "peak_rss": max(r[0]["peak_rss"] for r in reports), "out": out})
        first = rows[0]
        print(f"\n{args.method} {kwargs}" + (f" + boost beta={args.beta}" if args.beta >= 0 else "")
              + f"; per process, the largest over processes; ratios to P = {first['processes']}\n")
        print("| P | tensor bytes read (GB) | ratio | read() bytes (GB) | ratio | peak RSS (GB) | ratio "
              "| wall (s) | max diff to P = 1 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            diff = max_difference(str(first["out"]), str(row["out"])) if row is not first else 0.0
            print(f"| {row['processes']} | {row['tensor_bytes'] / 1e9:.2f} | {row['tensor_bytes'] / first['tensor_bytes']:.2f} "
                  f"| {row['rchar'] / 1e9:.2f} | {row['rchar'] / first['rchar']:.2f} "
                  f"| {row['peak_rss'] / 2**30:.2f} | {row['peak_rss'] / first['peak_rss']:.2f} "
                  f"| {row['wall_s']:.0f} | {diff:.1e} |")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
