"""``subboost demo``: the offline mini-benchmark, end to end, on a CPU.

Generates 20 image-classification tasks, pretrains a small CLIP-style ViT,
fine-tunes one expert per task, then merges 8 / 14 / 20 experts with every
method in the library, with and without Subspace Boosting, and writes
``results.json``, ``results.md`` and PNG plots to ``--out``. Trained models are
cached in ``--out``/cache (orbax checkpoints) and reused by the next run.

Examples::

  subboost demo                          # default size, ~15 min on 2 idle CPU cores (fine-tuning included)
  subboost demo --size tiny --out /tmp/demo   # the same pipeline in about 2 min
  subboost demo --size wide --out results_wide   # the width-128 benchmark before the tasks' own looks
  subboost demo --suite text --out results_text   # experts fine-tuned from all-MiniLM-L6-v2
                                                  # (needs the `text` extra)
"""

from __future__ import annotations

import argparse

from subboost.commands.common import add_command


def run_demo(args: argparse.Namespace) -> int:
    from subboost.bench.config import get_config
    from subboost.bench.pipeline import run_benchmark
    from subboost.bench.report import markdown_report

    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}.")
    if args.suite == "text":
        return run_text_demo(args)
    config = get_config(args.size)
    if args.pretrain_base:
        return pretrain_base_only(config, args)
    results = run_benchmark(
        config,
        seed=args.seed,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print()
    print(markdown_report(results))
    print(f"wrote {args.out}/results.json, results.md, accuracy_vs_tasks.png, stable_rank_vs_tasks.png, boost_sweep.png")
    return 0


def pretrain_base_only(config, args: argparse.Namespace) -> int:
    """``--pretrain-base``: pretrains the size's base from scratch and writes ``OUT/<size>_seed<seed>.npz``."""
    from pathlib import Path

    from subboost.bench.base import SHIPPED_BASES, pretrain_base

    path = Path(args.out) / f"{config.name}_seed{args.seed}.npz"
    digest = pretrain_base(config, seed=args.seed, path=path, progress=not args.no_progress)
    if config.base is not None and config.base in SHIPPED_BASES:
        same = "matches" if SHIPPED_BASES[config.base] == digest else "differs from"
        print(f"sha256 {digest} {same} the shipped base {config.base!r} ({SHIPPED_BASES[config.base]})")
    return 0


def run_text_demo(args: argparse.Namespace) -> int:
    from subboost.text_bench.config import get_config
    from subboost.text_bench.pipeline import RESULT_FILES, run_text_benchmark
    from subboost.text_bench.report import markdown_report

    results = run_text_benchmark(get_config(args.size), seed=args.seed, out_dir=args.out, cache_dir=args.cache_dir,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    print()
    print(markdown_report(results))
    print(f"wrote {args.out}/" + ", ".join(RESULT_FILES))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "demo", help="run the offline mini-benchmark (generated tasks, trained experts, all merges)", doc=__doc__)
    parser.add_argument("--suite", choices=("vision", "text"), default="vision",
                        help="vision: generated images, a ViT pretrained here (default); "
                             "text: generated sentences, experts fine-tuned from all-MiniLM-L6-v2")
    parser.add_argument("--size", choices=("tiny", "default", "wide"), default="default",
                        help="benchmark size (default: default; tiny is for CI; wide: default's pipeline with "
                             "one shared look and an 8000-step base, as before the tasks' own looks)")
    parser.add_argument("--out", default="results", help="output directory (default: results)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0): same seed, same tables")
    parser.add_argument("--cache-dir", default=None,
                        help="where trained models are cached (default: OUT/cache)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty directory not created by the demo")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--pretrain-base", action="store_true",
                        help="only pretrain the size's base encoder from scratch (the shipped one: --seed 0) "
                             "and write OUT/<size>_seed<seed>.npz with its sha256")
    parser.set_defaults(func=run_demo)
