"""Peak memory of the SVD merges (TSV-M by default) on ViT-L/14 MLP-shaped layers.

Builds T random task vectors holding only the MLP kernels of ``--layers``
ViT-L/14 blocks (``c_fc`` (1024, 4096), ``c_proj`` (4096, 1024), Flax
orientation) plus their biases, directly on the device (no host copies), then
runs one ``sb.merge`` and reports:

  * input size (the stacked task vectors),
  * XLA's compiled temporary-buffer size (``memory_analysis().temp_size_in_bytes``),
  * the process RSS just before the merge and its peak during the merge (the
    kernel's high-water mark, reset first via ``/proc/self/clear_refs``, so
    building the inputs does not count), and their difference.

Run once per setting in a fresh process, so each peak is that setting's own:

    python -m experiments.bench_svd_memory --layers 2 --tasks 20 --batch-size 1
    python -m experiments.bench_svd_memory --layers 2 --tasks 20            # whole groups

``--analyse-only`` compiles from shapes alone (nothing allocated, nothing run)
and prints XLA's buffer sizes, e.g. for all 24 ViT-L/14 blocks:

    python -m experiments.bench_svd_memory --layers 24 --tasks 20 --batch-size 1 --analyse-only
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import subboost as sb
from subboost import merging

GIB = 1024**3


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mlp_task_vectors(layers: int, tasks: int, width: int, mlp: int, seed: int) -> dict:
    """``transformer/resblocks_i/mlp/{c_fc,c_proj}/{kernel,bias}`` with a leading T axis."""
    key = jax.random.key(seed)
    blocks = {}
    for i in range(layers):
        k1, k2, key = jax.random.split(key, 3)
        blocks[f"resblocks_{i}"] = {
            "mlp": {
                "c_fc": {"kernel": 1e-3 * jax.random.normal(k1, (tasks, width, mlp)), "bias": jnp.zeros((tasks, mlp))},
                "c_proj": {"kernel": 1e-3 * jax.random.normal(k2, (tasks, mlp, width)), "bias": jnp.zeros((tasks, width))},
            }
        }
    return jax.block_until_ready({"transformer": blocks})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="tsv", choices=["tsv", "iso_c", "iso_cts"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=None, help="layers merged at once (default: whole groups)")
    parser.add_argument("--analyse-only", action="store_true", help="compile from shapes and report XLA's sizes")
    args = parser.parse_args()

    kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    # The program `sb.merge` runs: the method under jit, its hyper-parameters static.
    jitted = jax.jit(merging.METHODS[args.method], static_argnames=tuple(sorted(kwargs)))
    if args.analyse_only:
        shapes = jax.eval_shape(lambda: mlp_task_vectors(args.layers, args.tasks, args.width, args.mlp, seed=0))
        analysis = jitted.lower(shapes, **kwargs).compile().memory_analysis()
        print(
            f"method={args.method} T={args.tasks} layers={args.layers} MLP {args.width}x{args.mlp} "
            f"batch_size={args.batch_size} (compiled, not run)\n"
            f"  arguments {analysis.argument_size_in_bytes / GIB:7.2f} GiB  outputs {analysis.output_size_in_bytes / GIB:6.2f} GiB  "
            f"temporaries {analysis.temp_size_in_bytes / GIB:6.2f} GiB"
        )
        return
    tvs = mlp_task_vectors(args.layers, args.tasks, args.width, args.mlp, seed=0)
    input_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(tvs))
    compiled = jitted.lower(tvs, **kwargs).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    reset = reset_peak_rss()
    rss_before, _ = rss_bytes()
    start = time.perf_counter()
    merged = jax.block_until_ready(sb.merge(tvs, args.method, validate=False, **kwargs))
    seconds = time.perf_counter() - start
    _, rss_peak = rss_bytes()
    output_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(merged))
    per_layer_task = 2 * args.width * args.mlp * 4
    print(
        f"method={args.method} T={args.tasks} layers={args.layers} MLP {args.width}x{args.mlp} "
        f"batch_size={args.batch_size} backend={jax.default_backend()}\n"
        f"  input (stacked task vectors) {input_bytes / GIB:6.2f} GiB   output {output_bytes / GIB:6.3f} GiB\n"
        f"  one block, all T tasks       {per_layer_task * args.tasks / GIB:6.2f} GiB\n"
        f"  XLA temporaries (compiled)   {temp_bytes / GIB:6.2f} GiB\n"
        f"  RSS just before the merge    {rss_before / GIB:6.2f} GiB\n"
        f"  peak RSS during the merge    {rss_peak / GIB:6.2f} GiB   (+{(rss_peak - rss_before) / GIB:.2f} GiB)"
        f"{'' if reset else '  [peak not reset: includes input construction]'}\n"
        f"  merge time                   {seconds:6.1f} s"
    )


if __name__ == "__main__":
    main()
