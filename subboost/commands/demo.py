"""``subboost demo``: the offline mini-benchmark, end to end, on a CPU.

Generates 20 image-classification tasks, pretrains a small CLIP-style ViT,
fine-tunes one expert per task, then merges 8 / 14 / 20 experts with every
method in the library, with and without Subspace Boosting, and writes
``results.json``, ``results.md`` and PNG plots to ``--out``. Trained models are
cached in ``--out``/cache (orbax checkpoints) and reused by the next run.
Every suite registered in `subboost.bench.suites` runs with ``--suite NAME``
and writes to its own folder, ``results/NAME``, by default.

Examples::

  subboost demo                          # default size into results/vision, ~15 min on 2 idle CPU cores
  subboost demo --size tiny --out /tmp/demo   # the same pipeline in about 2 min (the CI size)
  subboost demo --seeds 0,1,2            # three seeds, then mean +- sd tables in results/vision/seeds.md
  subboost demo --size wide --out results_wide   # the width-128 benchmark before the tasks' own looks
  subboost demo --suite text --size real    # real labelled sentences (docs/text.md; data fetched once)
  subboost demo --suite text             # experts fine-tuned from all-MiniLM-L6-v2, into results/text
                                         # (needs the `text` extra)
"""

from __future__ import annotations

import argparse

from subboost.bench.suites import available_suites
from subboost.commands.common import add_command


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}.") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {text!r}.")
    return seeds


def run_demo(args: argparse.Namespace) -> int:
    from subboost.bench.pipeline import run_benchmark
    from subboost.bench.report import markdown_report
    from subboost.bench.suites import get_suite

    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}.")
    suite = get_suite(args.suite)
    if args.size not in suite.sizes:
        raise ValueError(f"--size {args.size!r}: the {suite.name} suite has sizes {', '.join(suite.sizes)}.")
    overrides = {}
    if args.data_dir is not None:
        if suite.name != "text" or args.size != "real":
            raise ValueError("--data-dir: prepared real text data are read by --suite text --size real only.")
        overrides["data_dir"] = args.data_dir
    config = suite.get_config(args.size, **overrides)
    out = suite.default_out if args.out is None else args.out
    if args.pretrain_base:
        if suite.name != "vision":
            raise ValueError("--pretrain-base pretrains the vision suite's base; the text suite starts from "
                             "all-MiniLM-L6-v2.")
        return pretrain_base_only(config, args, out)
    if args.seeds is not None:
        return run_seeds(config, args, out, parse_seeds(args.seeds))
    results = run_benchmark(config, seed=args.seed, out_dir=out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                            progress=not args.no_progress)
    print()
    print(markdown_report(results))
    print(f"wrote {out}/results.json, results.md and the plots")
    return 0


def run_seeds(config, args: argparse.Namespace, out: str, seeds: list[int]) -> int:
    """``--seeds``: one run per seed into ``OUT/seed<N>`` (models cached per seed in one cache), then the
    mean +- sd tables over the seeds (`subboost.bench.report.seed_summary`) in ``OUT/seeds.md`` and ``.json``."""
    import json
    from pathlib import Path

    from subboost.bench.pipeline import prepare_out_dir, run_benchmark
    from subboost.bench.report import seed_summary

    root = prepare_out_dir(out, overwrite=args.overwrite, result_files=("seeds.md", "seeds.json"))
    cache_dir = args.cache_dir if args.cache_dir is not None else root / "cache"
    paths = []
    for seed in seeds:
        run_benchmark(config, seed=seed, out_dir=root / f"seed{seed}", cache_dir=cache_dir, overwrite=args.overwrite,
                      progress=not args.no_progress)
        paths.append(Path(root / f"seed{seed}" / "results.json"))
    markdown, summary = seed_summary(paths)
    (root / "seeds.md").write_text(markdown)
    (root / "seeds.json").write_text(json.dumps(summary, indent=1))
    print()
    print(markdown)
    print(f"wrote {root}/seed<N>/ for seeds {', '.join(map(str, seeds))}, and {root}/seeds.md, seeds.json")
    return 0


def pretrain_base_only(config, args: argparse.Namespace, out: str) -> int:
    """``--pretrain-base``: pretrains the size's base from scratch and writes ``OUT/<size>_seed<seed>.npz``."""
    from pathlib import Path

    from subboost.bench.suites.vision.base import SHIPPED_BASES, pretrain_base

    path = Path(out) / f"{config.name}_seed{args.seed}.npz"
    digest = pretrain_base(config, seed=args.seed, path=path, progress=not args.no_progress)
    if config.base is not None and config.base in SHIPPED_BASES:
        same = "matches" if SHIPPED_BASES[config.base] == digest else "differs from"
        print(f"sha256 {digest} {same} the shipped base {config.base!r} ({SHIPPED_BASES[config.base]})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "demo", help="run the offline mini-benchmark (generated tasks, trained experts, all merges)", doc=__doc__)
    parser.add_argument("--suite", choices=available_suites(), default="vision",
                        help="vision: generated images, a ViT pretrained here (default); "
                             "text: generated sentences, experts fine-tuned from all-MiniLM-L6-v2")
    parser.add_argument("--size", choices=("tiny", "default", "wide", "real"), default="default",
                        help="benchmark size (default: default; tiny is for CI; wide, vision only: default's "
                             "pipeline with one shared look and an 8000-step base, as before the tasks' own looks; "
                             "real, text only: 11 tasks of real labelled sentences)")
    parser.add_argument("--data-dir", default=None,
                        help="--suite text --size real: the task files of `subboost data fetch --dir D` "
                             "(default: $SUBBOOST_TEXT_DATA or $XDG_CACHE_HOME/subboost/text_data)")
    parser.add_argument("--out", default=None, help="output directory (default: results/SUITE)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0): same seed, same tables")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated run seeds, e.g. 0,1,2: one run per seed in OUT/seed<N>, then mean +- sd "
                             "tables over the seeds in OUT/seeds.md (replaces --seed)")
    parser.add_argument("--cache-dir", default=None,
                        help="where trained models are cached, one entry per seed (default: OUT/cache)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty directory not created by the demo")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--pretrain-base", action="store_true",
                        help="only pretrain the size's base encoder from scratch (the shipped one: --seed 0) "
                             "and write OUT/<size>_seed<seed>.npz with its sha256")
    parser.set_defaults(func=run_demo)
