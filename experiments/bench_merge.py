"""Merge (+ boost) speed: subboost's grouped, jitted SVD vs a per-matrix numpy loop.

Builds a ViT-B/16-shaped visual tower (12 blocks, width 768, MLP 3072, scenic
CLIP names) and T random experts, then times, on the same inputs in the same
process:

  * subboost:  ``sb.merge(tvs, method)``, then for TA/TIES ``sb.subspace_boost(tau, beta)``
               (one batched, jit-compiled SVD per group of same-shaped matrices;
               TSV-M / Iso-CTS batch their per-task SVDs over layers and tasks);
  * baseline:  the same computation in numpy, ``np.linalg.svd`` one matrix (and,
               for TSV-M / Iso-CTS, one task) at a time, the way the reference
               PyTorch code loops over its state dict.

The SVD merges (tsv, iso_c, iso_cts) are timed without boosting ("merge" in the
pipeline column). Prints per (method, T): both wall times (median of --repeats
after a compiling warm-up call on zeros), their ratio, the max abs difference and the worst
leaf's max abs difference relative to its largest value.

    python -m experiments.bench_merge                       # full: T = 8, 14, 20, all methods
    python -m experiments.bench_merge --layers 2 --tasks 8  # quick
    python -m experiments.bench_merge --layers 1 --methods tsv,iso_c,iso_cts --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from tqdm import tqdm

import subboost as sb
from subboost.tree import nest


def vit_shapes(layers: int, width: int, mlp: int, heads: int) -> dict[str, tuple[int, ...]]:
    """Flat ``path -> shape`` of a scenic-CLIP visual tower."""
    head_dim = width // heads
    shapes = {
        "conv1/kernel": (16, 16, 3, width),
        "class_embedding": (width,),
        "positional_embedding": (197, width),
        "ln_pre/scale": (width,),
        "ln_post/scale": (width,),
        "proj": (width, 512),
    }
    for i in range(layers):
        b = f"transformer/resblocks_{i}"
        for name in ("query", "key", "value"):
            shapes[f"{b}/attn/{name}/kernel"] = (width, heads, head_dim)
            shapes[f"{b}/attn/{name}/bias"] = (heads, head_dim)
        shapes[f"{b}/attn/out/kernel"] = (heads, head_dim, width)
        shapes[f"{b}/mlp/c_fc/kernel"] = (width, mlp)
        shapes[f"{b}/mlp/c_fc/bias"] = (mlp,)
        shapes[f"{b}/mlp/c_proj/kernel"] = (mlp, width)
        shapes[f"{b}/ln_1/scale"] = (width,)
    return shapes


def random_task_vectors(shapes: dict, num_tasks: int, seed: int) -> dict[str, np.ndarray]:
    """Stacked task vectors: a shared low-rank part plus task-specific noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in shapes.items():
        x = rng.standard_normal((num_tasks,) + shape, dtype=np.float32) * 1e-3
        if len(shape) >= 2:
            rows = shape[0]
            cols = int(np.prod(shape[1:]))
            common = rng.standard_normal((rows, 4), dtype=np.float32) @ rng.standard_normal((4, cols), dtype=np.float32)
            x += 1e-3 * common.reshape(shape)
        out[path] = x
    return out


def torch_view(path: str, kernel: np.ndarray) -> np.ndarray:
    """Flax kernel -> PyTorch (out, in) matrix."""
    parent = path.split("/")[-2]
    if parent in ("query", "key", "value") and kernel.ndim == 3:
        return kernel.reshape(kernel.shape[0], -1).T
    if parent == "out" and kernel.ndim == 3:
        return kernel.reshape(-1, kernel.shape[-1]).T
    return kernel.T


def is_matrix_path(path: str, shape) -> bool:
    return path.endswith("/kernel") and path.startswith("transformer/")


def numpy_boost(mat: np.ndarray, beta: float) -> np.ndarray:
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    frac = np.cumsum(s) / max(s.sum(), np.finfo(s.dtype).tiny)
    k = min(int(np.searchsorted(frac, beta)), len(s) - 1)
    return (u * np.maximum(s, s[k])) @ vh


def numpy_ties(tvs: dict[str, np.ndarray], k: float) -> dict[str, np.ndarray]:
    keys = list(tvs)
    n = sum(tvs[p][0].size for p in keys)
    kk = n - int(n * k)
    thresholds = []
    for t in range(tvs[keys[0]].shape[0]):
        magnitudes = np.concatenate([np.abs(tvs[p][t]).ravel() for p in keys])
        thresholds.append(np.partition(magnitudes, kk - 1)[kk - 1])
    thr = np.asarray(thresholds, np.float32)
    trimmed = {p: np.where(np.abs(x) >= thr.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0) for p, x in tvs.items()}
    signs = {p: np.sign(x.sum(0)) for p, x in trimmed.items()}
    majority = np.sign(sum(s.sum() for s in signs.values()))
    out = {}
    for p, x in trimmed.items():
        s = np.where(signs[p] == 0, majority, signs[p])
        selected = np.where(np.where(s > 0, x > 0, x < 0), x, 0)
        out[p] = selected.sum(0) / np.maximum((selected != 0).sum(0), 1)
    return out


SVD_METHODS = ("tsv", "iso_c", "iso_cts")


def numpy_polar(x: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def numpy_tsv(mats: np.ndarray) -> np.ndarray:
    """TSV-M of one layer's (T, m, n) task matrices."""
    r = min(mats.shape[1:]) // len(mats)
    us, ss, vts = [], [], []
    for w in mats:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        us.append(u[:, :r])
        ss.append(s[:r])
        vts.append(vt[:r])
    return (numpy_polar(np.hstack(us)) * np.concatenate(ss)) @ numpy_polar(np.vstack(vts))


def numpy_iso_c(mats: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(mats.sum(0), full_matrices=False)
    return s.mean() * (u @ vt)


def numpy_iso_cts(mats: np.ndarray, fraction: float) -> np.ndarray:
    num_tasks = len(mats)
    s_dim = min(mats.shape[1:])
    common = s_dim - round((s_dim - int(s_dim * fraction)) / num_tasks) * num_tasks
    per_task = (s_dim - common) // num_tasks
    u, s, vt = np.linalg.svd(mats.sum(0), full_matrices=False)
    us, ss, vts = [u[:, :common]], [s[:common]], [vt[:common]]
    for w in mats:
        ut, st, vtt = np.linalg.svd(w - us[0] @ (us[0].T @ w), full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vts.append(vtt[:per_task])
    return np.concatenate(ss).mean() * (numpy_polar(np.hstack(us)) @ numpy_polar(np.vstack(vts)))


def numpy_svd_merge(tvs: dict[str, np.ndarray], method: str, fraction: float) -> dict[str, np.ndarray]:
    merged = {}
    for path, x in tvs.items():
        if is_matrix_path(path, x.shape[1:]):
            mats = np.stack([torch_view(path, x[t]) for t in range(len(x))])
            if method == "tsv":
                mat = numpy_tsv(mats)
            elif method == "iso_c":
                mat = numpy_iso_c(mats)
            else:
                mat = numpy_iso_cts(mats, fraction)
            merged[path] = mat.T.reshape(x.shape[1:])
        else:
            merged[path] = x.mean(0)
    return merged


def numpy_merge_and_boost(tvs: dict[str, np.ndarray], method: str, beta: float) -> dict[str, np.ndarray]:
    merged = numpy_ties(tvs, 0.2) if method == "ties" else {p: x.sum(0) for p, x in tvs.items()}
    for path, x in merged.items():
        if is_matrix_path(path, x.shape):
            mat = torch_view(path, x)
            merged[path] = numpy_boost(mat, beta).T.reshape(x.shape)
    return merged


def subboost_merge_and_boost(tvs, method: str, beta: float):
    tau = sb.merge(tvs, method, validate=False)
    return sb.subspace_boost(tau, beta=beta, validate=False)


def subboost_pipeline(tvs, method: str, args):
    if method in SVD_METHODS:
        kwargs = {"common_space_fraction": args.common_space_fraction} if method == "iso_cts" else {}
        return sb.merge(tvs, method, validate=False, **kwargs)
    return subboost_merge_and_boost(tvs, method, args.beta)


def numpy_pipeline(flat_tvs, method: str, args):
    if method in SVD_METHODS:
        return numpy_svd_merge(flat_tvs, method, args.common_space_fraction)
    return numpy_merge_and_boost(flat_tvs, method, args.beta)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tasks", default="8,14,20")
    parser.add_argument("--methods", default="task_arithmetic,ties,tsv,iso_c,iso_cts")
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--common-space-fraction", type=float, default=0.8, help="Iso-CTS")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    shapes = vit_shapes(args.layers, args.width, args.mlp, args.heads)
    print(f"backend={jax.default_backend()} devices={jax.devices()} layers={args.layers} width={args.width} mlp={args.mlp}")
    print(f"{'method':<16} {'pipeline':<12} {'T':>3} {'subboost s':>11} {'numpy loop s':>13} {'speed-up':>9} {'max |diff|':>11} {'rel. diff':>10}")
    rows = [(m, int(t)) for t in args.tasks.split(",") for m in args.methods.split(",")]
    for method, num_tasks in tqdm(rows, desc="bench", leave=False):
        flat_tvs = random_task_vectors(shapes, num_tasks, seed=num_tasks)
        tvs = jax.tree_util.tree_map(jax.numpy.asarray, nest(flat_tvs))
        # Compile on zeros of the same shapes: the jit cache is warm, and the
        # warm-up costs little (LAPACK is fast on zero matrices).
        jax.block_until_ready(subboost_pipeline(jax.tree_util.tree_map(jax.numpy.zeros_like, tvs), method, args))
        t_sb, out_sb = timed(lambda: subboost_pipeline(tvs, method, args), args.repeats)
        t_np, out_np = timed(lambda: numpy_pipeline(flat_tvs, method, args), max(1, args.repeats - 2))
        flat_sb = dict(sb.tree.leaves_with_paths(out_sb))
        diff = max(float(np.max(np.abs(np.asarray(flat_sb[p]) - out_np[p]))) for p in out_np)
        # Worst leaf's max |diff| relative to that leaf's max |numpy value|.
        rel = max(
            float(np.max(np.abs(np.asarray(flat_sb[p]) - out_np[p])) / max(np.max(np.abs(out_np[p])), 1e-30))
            for p in out_np
        )
        pipeline = "merge" if method in SVD_METHODS else "merge+boost"
        tqdm.write(f"{method:<16} {pipeline:<12} {num_tasks:>3} {t_sb:>11.3f} {t_np:>13.3f} {t_np / t_sb:>8.2f}x {diff:>11.2e} {rel:>10.1e}")
        del tvs, flat_tvs


if __name__ == "__main__":
    main()
