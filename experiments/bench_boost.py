"""Subspace Boosting speed: exact SVD path vs polar path vs a per-matrix torch loop.

Builds ViT-B/16- and ViT-L/14-shaped merged task vectors (scenic CLIP names,
Flax kernel layouts; attention q/k/v/out ``(D, D)``, MLP ``(4D, D)`` and
``(D, 4D)`` in PyTorch orientation) from `synthetic_merged_matrix` and times,
on the same inputs in the same process:

  * svd:    ``sb.subspace_boost(tau, beta, solver="svd")``: one batched,
            jit-compiled exact SVD per group of same-shaped matrices;
  * polar:  ``solver="polar"``: QDWH polar factor + top triplets by subspace
            iteration (`subboost.polar_boost`), SVD fallback where unconverged;
  * torch:  ``torch.linalg.svd`` one matrix at a time, the reference code's way.

Each time is the median of ``--repeats`` calls (the methods interleaved, after a
warm-up call that includes compilation). Errors are relative Frobenius
``||B - B_svd|| / ||B_svd||`` per matrix (max over matrices). A second table
times ``linalg.svd`` of the tall MLP groups directly and via QR + SVD of ``R``
(the ``method="qr"`` route), to decide `subboost.linalg.TALL_QR_BACKENDS`.

    python -m experiments.bench_boost                                   # both models, all layers
    python -m experiments.bench_boost --models vit_b16 --layers 2 --tasks 8   # quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import subboost as sb
from subboost import linalg

MODELS: dict[str, dict[str, int]] = {
    "vit_b16": {"width": 768, "mlp": 3072, "heads": 12, "layers": 12},
    "vit_l14": {"width": 1024, "mlp": 4096, "heads": 16, "layers": 24},
}


def synthetic_merged_matrix(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    num_tasks: int,
    *,
    common_rank: int = 4,
    task_rank: int = 8,
    task_scale: float = 0.5,
    noise: float = 0.05,
    scale: float = 1e-3,
    dtype=np.float32,
) -> np.ndarray:
    """Task arithmetic of ``T`` synthetic task vectors, ``sum_t (C + A_t + N_t)``, in closed form.

    ``C``: a rank-``common_rank`` direction set every task shares; ``A_t``: a
    task-specific rank-``task_rank`` part; ``N_t``: i.i.d. Gaussian noise
    (their sum is ``sqrt(T)`` times one noise matrix). The merged matrix has the
    collapsed spectrum the paper describes: a few dominant common directions,
    ``T * task_rank`` medium ones, and a full-rank noise floor.
    """
    def low_rank(rank: int) -> np.ndarray:
        return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / math.sqrt(cols)

    merged = num_tasks * low_rank(common_rank) + task_scale * low_rank(num_tasks * task_rank)
    merged += noise * math.sqrt(num_tasks) * rng.standard_normal((rows, cols))
    return (scale * merged).astype(dtype)


def vit_task_vector(width: int, mlp: int, heads: int, layers: int, num_tasks: int, seed: int) -> dict:
    """A merged task vector of a scenic-CLIP visual tower (matrix leaves plus a few others)."""
    rng = np.random.default_rng(seed)
    head_dim = width // heads
    blocks = {}
    for i in range(layers):
        attn = {}
        for name in ("query", "key", "value"):
            w = synthetic_merged_matrix(rng, width, width, num_tasks)  # (out = heads * head_dim, in)
            attn[name] = {
                "kernel": w.T.reshape(width, heads, head_dim),
                "bias": np.zeros((heads, head_dim), np.float32),
            }
        w = synthetic_merged_matrix(rng, width, width, num_tasks)  # (out = embed, in = heads * head_dim)
        attn["out"] = {"kernel": w.T.reshape(heads, head_dim, width), "bias": np.zeros(width, np.float32)}
        blocks[f"resblocks_{i}"] = {
            "attn": attn,
            "mlp": {
                "c_fc": {"kernel": synthetic_merged_matrix(rng, mlp, width, num_tasks).T},
                "c_proj": {"kernel": synthetic_merged_matrix(rng, width, mlp, num_tasks).T},
            },
            "ln_1": {"scale": np.zeros(width, np.float32)},
        }
    tree = {"transformer": blocks, "proj": np.zeros((width, 512), np.float32)}
    return jax.tree_util.tree_map(jnp.asarray, tree)


def torch_boost_loop(matrices: list, beta: float) -> list:
    """The reference code's way: ``torch.linalg.svd`` per matrix, cumsum cutoff, rebuild."""
    import torch

    out = []
    for w in matrices:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        fraction = torch.cumsum(s, 0) / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
        k = min(int((fraction < beta).sum()), len(s) - 1)
        out.append((u * torch.clamp(s, min=s[k])) @ vh)
    return out


def relative_errors(got: dict, want: dict) -> np.ndarray:
    """Per matrix ``||got - want||_F / ||want||_F`` over groups ``{g: (G, m, n)}``."""
    errors = []
    for g, w in want.items():
        w = np.asarray(w, np.float64)
        d = np.asarray(got[g], np.float64) - w
        errors.append(np.linalg.norm(d, axis=(-2, -1)) / np.maximum(np.linalg.norm(w, axis=(-2, -1)), 1e-30))
    return np.concatenate(errors)


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, calls interleaved so shared-CPU noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(name: str, shape: dict, num_tasks: int, args) -> None:
    tau = vit_task_vector(**shape, num_tasks=num_tasks, seed=num_tasks)
    plan = sb.matrix_plan(tau)
    groups = plan.gather(tau)
    options = dict(mode=args.mode, batch_size=args.batch_size, validate=False)

    def run(solver):
        return lambda: sb.subspace_boost(tau, beta=args.beta, solver=solver, **options)

    fns = {"svd": run("svd"), "polar": run("polar")}
    compile_s = {}
    results = {}
    for solver, fn in fns.items():
        start = time.perf_counter()
        results[solver] = jax.block_until_ready(fn())
        compile_s[solver] = time.perf_counter() - start
    if not args.no_torch:
        import torch

        torch_inputs = [torch.from_numpy(np.array(m)) for g in plan.groups for m in np.asarray(groups[g])]
        fns["torch"] = lambda: torch_boost_loop(torch_inputs, args.beta)
        torch_out = fns["torch"]()
    medians = interleaved_medians(fns, args.repeats)

    want = plan.gather(results["svd"])
    polar_err = relative_errors(plan.gather(results["polar"]), want)
    _, report = sb.subspace_boost(tau, beta=args.beta, solver="polar", return_info=True, **options)
    fallbacks = sum(int(g.fallback.sum()) for g in report.groups)
    row = (
        f"{name:<8} {num_tasks:>3} {sum(plan.group_sizes):>5} "
        f"{medians['svd']:>8.2f} {medians['polar']:>8.2f} {medians['svd'] / medians['polar']:>9.2f}x "
        f"{polar_err.max():>9.1e} {fallbacks:>4}"
    )
    if "torch" in medians:
        sizes = [groups[g].shape[0] for g in plan.groups]
        torch_groups, start = {}, 0
        for g, size in zip(plan.groups, sizes):
            torch_groups[g] = np.stack([t.numpy() for t in torch_out[start : start + size]])
            start += size
        torch_err = relative_errors(torch_groups, want)
        row += (
            f" {medians['torch']:>8.2f} {medians['torch'] / medians['svd']:>9.2f}x "
            f"{medians['torch'] / medians['polar']:>9.2f}x {torch_err.max():>9.1e}"
        )
    tqdm.write(row)
    tqdm.write(f"{'':<13}compile+first call: svd {compile_s['svd']:.1f}s, polar {compile_s['polar']:.1f}s")
    if args.verbose:
        tqdm.write(report.summary())


def bench_tall_svd(name: str, shape: dict, args) -> None:
    """``linalg.svd`` of the MLP groups: direct vs QR + SVD of R."""
    tau = vit_task_vector(**{**shape, "layers": min(shape["layers"], args.layers or shape["layers"])},
                          num_tasks=8, seed=0)
    plan = sb.matrix_plan(tau)
    for g, x in plan.gather(tau).items():
        if g[0] == g[1]:
            continue
        direct = jax.jit(lambda x: linalg.svd(x, method="direct"))
        via_qr = jax.jit(lambda x: linalg.svd(x, method="qr"))
        jax.block_until_ready((direct(x), via_qr(x)))
        medians = interleaved_medians({"direct": lambda: direct(x), "qr": lambda: via_qr(x)}, args.repeats)
        s_direct, s_qr = direct(x)[1], via_qr(x)[1]
        err = float(jnp.max(jnp.abs(s_direct - s_qr) / s_direct[..., :1]))
        tqdm.write(
            f"{name:<8} {g[0]:>5} x {g[1]:<5} {x.shape[0]:>3} {medians['direct']:>8.2f} {medians['qr']:>8.2f} "
            f"{medians['direct'] / medians['qr']:>8.2f}x {err:>9.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_b16,vit_l14", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--layers", type=int, default=None, help="limit the blocks per model (quick runs)")
    parser.add_argument("--tasks", default="8,20", help="comma list of T")
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--mode", default="cumsum", choices=["cumsum", "index"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch.linalg.svd loop")
    parser.add_argument("--no-tall-svd", action="store_true", help="skip the direct-vs-QR SVD table")
    parser.add_argument("--verbose", action="store_true", help="print the polar solver's report per run")
    args = parser.parse_args()

    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if not args.no_torch:
        import torch

        torch_info = f" torch={torch.__version__} threads={torch.get_num_threads()}"
    else:
        torch_info = ""
    print(f"backend={jax.default_backend()} devices={jax.devices()} beta={args.beta} mode={args.mode} "
          f"repeats={args.repeats}{torch_info}")
    header = f"{'model':<8} {'T':>3} {'mats':>5} {'svd s':>8} {'polar s':>8} {'svd/polar':>10} {'polar err':>9} {'fb':>4}"
    if not args.no_torch:
        header += f" {'torch s':>8} {'torch/svd':>10} {'torch/pol':>10} {'torch err':>9}"
    print(header)
    runs = [(m, int(t)) for m in models for t in args.tasks.split(",")]
    for name, num_tasks in tqdm(runs, desc="bench", leave=False):
        shape = dict(MODELS[name])
        if args.layers is not None:
            shape["layers"] = min(shape["layers"], args.layers)
        bench_model(name, shape, num_tasks, args)
        jax.clear_caches()  # free compiled executables between models
    if not args.no_tall_svd:
        print("\nlinalg.svd of the tall/wide groups (T=8): direct vs QR then SVD of R")
        print(f"{'model':<8} {'shape':>13} {'G':>3} {'direct s':>8} {'qr s':>8} {'dir/qr':>9} {'max ds/s0':>9}")
        for name in models:
            bench_tall_svd(name, MODELS[name], args)


if __name__ == "__main__":
    main()
