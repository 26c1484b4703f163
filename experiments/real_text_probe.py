"""Calibration probe for the real-data text suite: pretrained-with-heads vs fine-tuned experts, per task.

Fine-tunes one expert per real task (`subboost.bench.suites.text.real_tasks`, the text suite's size
``real`` with the settings given here) from all-MiniLM-L6-v2 with
the text suite's own trainer and frozen prototype heads, and prints each task's test accuracy
for the pretrained model with its heads and for its expert, the training loss at the start and
end, and the wall time. No merging, no boosting: it only finds fine-tuning settings where the
issue's expert targets hold (experts >= 15 points above the pretrained model with heads, and
below 95% on average), which the merging run then uses unchanged.

    nice -n 10 python -m experiments.real_text_probe --tasks 11 --steps 100 --out /tmp/probe
    nice -n 10 python -m experiments.real_text_probe --layers 1 --steps 20 --train 128   # a quick look

Experts are cached under ``--out``/cache by training key (re-runs with the same settings evaluate only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

BETAS = (0.0, 0.01, 0.02, 0.05, 0.1)  # the cutoff report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=11)
    parser.add_argument("--layers", type=int, default=None, help="blocks kept (default: all 6)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train", type=int, default=1024, help="training sentences per task")
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--head-shots", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="/tmp/real_text_probe")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from subboost import blas_threads
    from subboost.bench.suites.text import evaluate as text_eval
    from subboost.bench.suites.text.config import get_config
    from subboost.bench.suites.text.pipeline import load_or_train

    config = get_config("real", data_dir=args.data_dir, layers=args.layers, num_tasks=args.tasks,
                        task_counts=(args.tasks,), train_per_task=args.train, val_per_task=args.val,
                        test_per_task=args.test, head_shots=args.head_shots, max_length=args.max_length,
                        finetune_steps=args.steps, finetune_batch=args.batch, finetune_lr=args.lr,
                        finetune_warmup=max(args.steps // 10, 1), steps_per_call=min(25, args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with blas_threads.limited():
        loaded = load_or_train(config, seed=args.seed, cache_dir=out / "cache", progress=False)
        model, base, suite, heads = loaded["model"], loaded["base"], loaded["suite"], loaded["heads"]
        experts = loaded["experts"]
        if "embeddings" in experts:
            experts = experts["encoder"]
        heads_j = jax.tree_util.tree_map(jnp.asarray, heads)
        test = tuple(jnp.asarray(a) for a in (suite.test.input_ids, suite.test.attention_mask, suite.test.labels))
        static = {"model": model, "batch": config.eval_batch}
        pretrained = np.asarray(text_eval.accuracies(base, *test, heads_j, **static))
        expert = np.asarray(text_eval.expert_accuracies(base, experts, *test, heads_j, **static))
        regime_figures, expert_cutoffs = task_vector_regime(base, experts, config.num_tasks)
    wall = time.perf_counter() - start
    losses = loaded["meta"].get("finetune_losses") or [[float("nan")]] * config.num_tasks
    print(f"settings: {json.dumps(vars(args))}; sequence length {suite.length}, {suite.truncated} sentences "
          f"truncated; cache hit {loaded['cache_hit']}; timings {json.dumps({k: round(v, 1) for k, v in loaded['timings'].items()})}")
    print("| task | classes | pretrained + heads | expert | gain | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for t, task in enumerate(suite.tasks):
        print(f"| {task.name} | {task.num_classes} | {100 * pretrained[t]:.1f} | {100 * expert[t]:.1f} | "
              f"{100 * (expert[t] - pretrained[t]):+.1f} | {losses[t][0]:.3f} -> {losses[t][-1]:.3f} |")
    print(f"| mean | | {100 * pretrained.mean():.1f} | {100 * expert.mean():.1f} | "
          f"{100 * (expert.mean() - pretrained.mean()):+.1f} | |")
    print()
    print(f"task vectors: mean pairwise cosine {regime_figures['cosine_mean']:.3f} (max "
          f"{regime_figures['cosine_max']:.3f}); sum of all {config.num_tasks}: stable rank "
          f"{regime_figures['sum'][str(config.num_tasks)]['stable_rank']:.2f}, share of matrices with k > 0 per beta "
          f"{regime_figures['sum'][str(config.num_tasks)]['cutoff_nonzero']}")
    print("| task | relative norm (%) | stable rank | matrices with k > 0 at beta " + " / ".join(map(str, BETAS)) + " |")
    print("|---|---|---|---|")
    for t, task in enumerate(suite.tasks):
        print(f"| {task.name} | {100 * regime_figures['relative_norms'][t]:.2f} | "
              f"{regime_figures['expert_stable_rank'][t]:.2f} | "
              + " / ".join(str(expert_cutoffs[t][b]) for b in BETAS) + f" of {expert_cutoffs[t]['matrices']} |")
    print(f"wall {wall:.0f} s (fine-tuning included unless cached); load average {os.getloadavg()[0]:.1f}")
    (out / f"probe_seed{args.seed}_steps{args.steps}.json").write_text(json.dumps(
        {"settings": vars(args), "pretrained": pretrained.tolist(), "experts": expert.tolist(),
         "tasks": [t.name for t in suite.tasks], "losses": losses, "wall_s": wall, "timings": loaded["timings"],
         "regime": regime_figures, "expert_cutoffs": [{str(k): v for k, v in c.items()} for c in expert_cutoffs]}))


def task_vector_regime(base, experts, num_tasks: int):
    """`subboost.bench.suites.text.regime.regime` of the experts' task vectors, and for each expert the number of
    its matrices whose boosting cutoff index is positive at each of `BETAS`."""
    import jax
    import numpy as np

    import subboost as sb
    from subboost.bench.pipeline import cutoff_indices, task_vectors_of
    from subboost.bench.suites.text.regime import regime

    tvs = task_vectors_of(base["encoder"], experts, num_tasks)
    figures = regime(base["encoder"], tvs, task_counts=(num_tasks,), betas=BETAS)
    per_expert = []
    for t in range(num_tasks):
        ks = cutoff_indices(sb.spectra(jax.tree_util.tree_map(lambda x, t=t: x[t], tvs)), BETAS)
        per_expert.append({**{b: int(np.sum(k > 0)) for b, k in ks.items()}, "matrices": int(len(ks[BETAS[0]]))})
    return figures, per_expert


if __name__ == "__main__":
    main()
