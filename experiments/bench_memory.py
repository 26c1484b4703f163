"""Peak memory and wall time: streaming merge from disk vs the in-memory path.

Writes T random, seeded experts and their base, shaped like the CLIP ViT-L/14
visual tower (24 blocks, width 1024; 304M parameters, 1.2 GB each in float32),
to ``--workdir``; then, each in a fresh subprocess so that its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

  * streaming: ``subboost.streaming.merge_from_checkpoints`` (TIES, global
    top-k, + Subspace Boosting), one chunk of layers at a time;
  * in memory: load everything, ``sb.task_vectors`` -> ``sb.merge`` ->
    ``sb.subspace_boost`` -- only when its estimated peak fits in the
    machine's available memory (20 x ViT-L/14 does not: ~24 GB of task vectors).

Prints wall time and peak RSS side by side, their ratio, and the largest
difference between the two results when both ran. The workdir is deleted at
the end unless ``--keep``.

    python -m experiments.bench_memory                          # 20 x ViT-L/14: writes ~25 GB
    python -m experiments.bench_memory --experts 20 --layers 2  # in-memory path fits: both run
    python -m experiments.bench_memory --experts 3 --layers 1 --width 64 --mlp 256 --heads 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

RSS_TARGET_GB = 4.0


def vit_shapes(layers: int, width: int, mlp: int, heads: int, patch: int = 14, image: int = 224,
               embed: int = 768) -> dict[str, tuple[int, ...]]:
    """Flat ``path -> shape`` of a scenic-CLIP visual tower (subboost.models naming)."""
    head_dim = width // heads
    shapes = {
        "conv1/kernel": (patch, patch, 3, width),
        "class_embedding": (width,),
        "positional_embedding": ((image // patch) ** 2 + 1, width),
        "ln_pre/scale": (width,), "ln_pre/bias": (width,),
        "ln_post/scale": (width,), "ln_post/bias": (width,),
        "proj": (width, embed),
    }
    for i in range(layers):
        block = f"transformer/resblocks_{i}"
        for name in ("query", "key", "value"):
            shapes[f"{block}/attn/{name}/kernel"] = (width, heads, head_dim)
            shapes[f"{block}/attn/{name}/bias"] = (heads, head_dim)
        shapes[f"{block}/attn/out/kernel"] = (heads, head_dim, width)
        shapes[f"{block}/attn/out/bias"] = (width,)
        for norm in ("ln_1", "ln_2"):
            shapes[f"{block}/{norm}/scale"] = (width,)
            shapes[f"{block}/{norm}/bias"] = (width,)
        shapes[f"{block}/mlp/c_fc/kernel"] = (width, mlp)
        shapes[f"{block}/mlp/c_fc/bias"] = (mlp,)
        shapes[f"{block}/mlp/c_proj/kernel"] = (mlp, width)
        shapes[f"{block}/mlp/c_proj/bias"] = (width,)
    return shapes


def generate(workdir: Path, shapes: dict[str, tuple[int, ...]], experts: int, seed: int) -> tuple[Path, list[Path]]:
    """Base ~ N(0, 0.02^2); expert t = base + N(0, 0.002^2), leaf by leaf (seeded per leaf and expert)."""
    from subboost.streaming import SafetensorsWriter

    specs = {name: (shape, np.float32) for name, shape in shapes.items()}
    base_path = workdir / "base.safetensors"
    expert_paths = [workdir / f"expert_{t:02d}.safetensors" for t in range(experts)]
    writers = [SafetensorsWriter(p, specs) for p in [base_path, *expert_paths]]
    total = sum(math.prod(s) for s in shapes.values()) * 4 * (experts + 1)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing experts") as bar:
        for index, (name, shape) in enumerate(shapes.items()):
            base = np.random.default_rng([seed, index]).standard_normal(shape, np.float32) * np.float32(0.02)
            writers[0].write(name, base)
            for t, writer in enumerate(writers[1:]):
                noise = np.random.default_rng([seed, index, t + 1]).standard_normal(shape, np.float32)
                writer.write(name, base + np.float32(0.002) * noise)
            bar.update(base.nbytes * (experts + 1))
    for writer in writers:
        writer.close()
    return base_path, expert_paths


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """One measured run (in its own process); prints one JSON line."""
    import jax

    import subboost as sb
    from subboost import streaming

    workdir = Path(args.workdir)
    base_path = workdir / "base.safetensors"
    expert_paths = sorted(workdir.glob("expert_*.safetensors"))
    start = time.perf_counter()
    if args.child == "stream":
        out = streaming.merge_from_checkpoints(
            base_path, expert_paths, method="ties", k=args.k, boost=args.beta, out=workdir / "merged_stream",
            chunk_bytes=args.chunk_mb * 2**20, progress=True,
        )
        result = str(out / streaming.PARAMS_FILE)
    else:
        base = streaming.read_params(base_path)
        experts = [streaming.read_params(p) for p in expert_paths]
        tvs = sb.task_vectors(base, experts)
        del experts
        tau = sb.subspace_boost(sb.merge(tvs, "ties", k=args.k), beta=args.beta)
        jax.block_until_ready(tau)
        result = str(streaming.save_safetensors(tau, workdir / "merged_in_memory.safetensors"))
    print(json.dumps({"path": args.child, "wall_s": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb(),
                      "result": result}))


def run_child(args: argparse.Namespace, which: str) -> dict:
    command = [sys.executable, "-m", "experiments.bench_memory", "--child", which, "--workdir", str(args.workdir),
               "--k", str(args.k), "--beta", str(args.beta), "--chunk-mb", str(args.chunk_mb)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def max_difference(a: str, b: str) -> float:
    from subboost.streaming import open_checkpoint

    first, second = open_checkpoint(a), open_checkpoint(b)
    worst = 0.0
    for name in first.specs:
        x, y = first.read([name])[name], second.read([name])[name]
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--layers", type=int, default=24, help="ViT-L/14 has 24")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--k", type=float, default=0.2, help="TIES top-k fraction")
    parser.add_argument("--beta", type=float, default=0.01, help="Subspace Boosting beta")
    parser.add_argument("--chunk-mb", type=int, default=256, help="streaming chunk, MiB over all experts")
    parser.add_argument("--in-memory", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a fresh directory under $TMPDIR")
    parser.add_argument("--keep", action="store_true", help="keep the generated experts and results")
    parser.add_argument("--child", choices=("stream", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    shapes = vit_shapes(args.layers, args.width, args.mlp, args.heads)
    model_gb = sum(math.prod(s) for s in shapes.values()) * 4 / 2**30
    need_disk = model_gb * (args.experts + 3)
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="subboost_bench_memory_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(args.workdir).free / 2**30
    if need_disk > 0.9 * free_disk:
        raise SystemExit(f"needs ~{need_disk:.1f} GB on disk, {free_disk:.1f} GB free under {args.workdir}.")
    print(f"{args.experts} experts x {args.layers} blocks (width {args.width}, MLP {args.mlp}): "
          f"{model_gb:.2f} GB per model, {model_gb * (args.experts + 1):.1f} GB on disk in {args.workdir}")
    try:
        start = time.perf_counter()
        generate(args.workdir, shapes, args.experts, args.seed)
        print(f"generated in {time.perf_counter() - start:.0f} s")
        rows = [run_child(args, "stream")]
        # In memory: experts (T) + stacked task vectors (T) + TIES temporaries (~T) + base and results.
        estimate_gb = model_gb * (3 * args.experts + 4) + 0.5
        fits = estimate_gb < 0.8 * available_gb()
        if args.in_memory == "always" or (args.in_memory == "auto" and fits):
            rows.append(run_child(args, "memory"))
        else:
            print(f"in-memory path skipped: needs ~{estimate_gb:.0f} GB, {available_gb():.0f} GB available")
        print("\n| path | wall time (s) | peak RSS (GB) |\n|---|---:|---:|")
        for row in rows:
            print(f"| {row['path']} | {row['wall_s']:.1f} | {row['peak_rss_gb']:.2f} |")
        stream = rows[0]
        print(f"\nstreaming peak RSS {stream['peak_rss_gb']:.2f} GB "
              f"({'under' if stream['peak_rss_gb'] < RSS_TARGET_GB else 'OVER'} the {RSS_TARGET_GB:.0f} GB target)")
        if len(rows) == 2:
            memory = rows[1]
            print(f"in-memory / streaming: wall {memory['wall_s'] / stream['wall_s']:.2f}x, "
                  f"peak RSS {memory['peak_rss_gb'] / stream['peak_rss_gb']:.2f}x")
            print(f"max |streaming - in-memory| = {max_difference(stream['result'], memory['result']):.3g}")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
