"""``subboost analyze``: HO-GSVD alignment and rank-collapse figures for a set of experts.

Examples::

  # experts as checkpoints (orbax directories or .safetensors) against their base
  subboost analyze expert_a expert_b expert_c --base base_ckpt --out analysis/

  # or stacked task vectors in one .npz ("a/b/kernel" keys, leading expert axis;
  # optional "__names__" string array), e.g. written by `save_task_vectors_npz`
  # (subboost.checkpoint_io.task_vectors_npz)
  subboost analyze task_vectors.npz --out analysis/ --method ties --param k=0.2

Writes, each PNG with a JSON of the numbers drawn next to it:
  gsv_distributions.png   generalized singular values per expert + merged reference
  alignment.png           HO-GSVD alignment matrix (experts + merged reference)
  rank_collapse.png       stable / energy rank vs number of merged experts, per layer type
  spectra.png             merged spectra as experts are added (and spectra_boosted.png)
and summary.json (settings, expert names, the greedy expert ranking).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from subboost.checkpoint_io.task_vectors_npz import load_task_vectors_npz
from subboost.commands.common import add_command, add_merge_method_arguments
from subboost.expert_analysis import check_analysis_output, write_analysis
from subboost.grids import DEFAULT_BETA
from subboost.errors import SubboostError
from subboost.task_vectors import num_experts
from subboost.tree import ATTENTION_MODES, PyTree


def _load(args: argparse.Namespace) -> tuple[PyTree, list[str]]:
    paths = [Path(p) for p in args.experts]
    if len(paths) == 1 and paths[0].suffix == ".npz":
        if args.base is not None:
            raise SubboostError("--base is not used with an .npz of task vectors (they are differences already).")
        tvs, names = load_task_vectors_npz(paths[0])
        tvs = jax.tree_util.tree_map(np.asarray, tvs)
        default_names = names or [f"expert {t}" for t in range(num_experts(tvs))]
    else:
        if args.base is None:
            raise SubboostError("--base BASE is required when the experts are checkpoints.")
        for p in paths:
            if p.suffix == ".npz":
                raise SubboostError(f"{str(p)!r}: an .npz of task vectors must be the only EXPERTS argument.")
        from subboost.checkpoints import load_experts

        tvs = load_experts(args.base, paths)
        default_names = [p.name or str(p) for p in paths]
    num = num_experts(tvs)
    if num < 2:
        raise SubboostError(f"analyze needs at least 2 experts, got {num}.")
    names = [n.strip() for n in args.names.split(",")] if args.names else default_names
    if len(names) != num:
        raise SubboostError(f"--names gives {len(names)} names for {num} experts.")
    if len(set(names)) != len(names):
        raise SubboostError(f"expert names must be distinct, got {names}.")
    return tvs, names


def _check_arguments(args: argparse.Namespace) -> dict:
    """Every argument checked before anything is loaded, computed or written."""
    from subboost.commands.common import merge_method_kwargs
    from subboost.merging import METHODS
    from subboost.validation import check_real

    check_real("--fraction", args.fraction, what="analyze", low=0.0, high=1.0, low_open=True)
    if not args.no_boost:
        check_real("--beta", args.beta, what="analyze", low=0.0, high=1.0)
    if args.pi is not None:
        check_real("--pi", args.pi, what="analyze", low=0.0, low_open=True)
    if args.method not in METHODS:
        raise SubboostError(f"unknown merge method {args.method!r}; known methods: {', '.join(METHODS)}.")
    return merge_method_kwargs(args)


def run_analyze(args: argparse.Namespace) -> int:
    from subboost.merging import check_arguments

    merge_kwargs = _check_arguments(args)
    inputs = [*args.experts] + ([args.base] if args.base else [])
    # before the (slow) loading; nothing is created before the end
    check_analysis_output(args.out, overwrite=args.overwrite, inputs=inputs, name="--out")
    tvs, names = _load(args)
    check_arguments(args.method, merge_kwargs, len(names))
    written = write_analysis(
        tvs, names, args.out, overwrite=args.overwrite, inputs=inputs, name="--out", method=args.method,
        merge_kwargs=merge_kwargs, beta=None if args.no_boost else args.beta, hogsvd_method=args.hogsvd_method,
        pi=args.pi, attention=args.attention, fraction=args.fraction,
    )
    for path in written.values():
        print(f"wrote {path} (+ {path.with_suffix('.json').name})")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    import subboost as sb

    parser = add_command(subparsers, "analyze", help="HO-GSVD alignment and rank-collapse figures (PNG + JSON)", doc=__doc__)
    parser.add_argument("experts", nargs="+", help="expert checkpoints, or one .npz of stacked task vectors")
    parser.add_argument("--base", default=None, help="pretrained checkpoint (required for checkpoints)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier analysis files in --out")
    parser.add_argument("--names", default=None, help="comma-separated expert names (default: file names)")
    add_merge_method_arguments(parser, methods=sb.available_methods())
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA,
                        help=f"Subspace Boosting cutoff of the boosted curves (default {DEFAULT_BETA:g})")
    parser.add_argument("--no-boost", action="store_true", help="skip the boosted curves")
    parser.add_argument("--hogsvd-method", choices=("robust", "classic"), default="robust",
                        help="HO-GSVD variant (default robust; classic needs full-column-rank matrices)")
    parser.add_argument("--pi", type=float, default=None, help="robust HO-GSVD regulariser (default 1/T)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="per_qkv",
                        help="how attention kernels form matrices (default per_qkv)")
    parser.add_argument("--fraction", type=float, default=0.95, help="energy fraction of the energy rank")
    parser.set_defaults(func=run_analyze)
