"""``subboost merge`` and ``subboost boost``: merge checkpoints from the command line.

Examples::

  # TIES-merge three experts, boost with beta = 0.02, write base + 0.3 * tau
  subboost merge --base base_ckpt expert_a expert_b expert_c \\
      --method ties --param k=0.2 --beta 0.02 --alpha 0.3 --out merged_ckpt

  # boost an already merged model (boosting commutes with the alpha scaling)
  subboost boost merged_ckpt --base base_ckpt --beta 0.02 --out boosted_ckpt
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import jax

import subboost as sb
from subboost.boosting import BOOST_MODES
from subboost.commands.common import add_command, add_merge_method_arguments
from subboost.grids import DEFAULT_BETA, PAPER_BETAS
from subboost.tree import ATTENTION_MODES


def parse_param(text: str) -> tuple[str, Any]:
    """``"k=0.2"`` -> ``("k", 0.2)``; values are Python literals or bare strings."""
    if "=" not in text:
        raise ValueError(f"--param expects NAME=VALUE, got {text!r}.")
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:  # "nan", "inf": numbers, so that the method's check refuses them by name
            value = float(raw)
        except ValueError:
            value = raw
    return name.strip(), value


def stable_rank_table(before: dict, after: dict | None = None) -> str:
    """Markdown table of per-matrix stable ranks (before / after boosting)."""
    header = "| matrix | stable rank |" + (" boosted |" if after is not None else "")
    rule = "|---|---:|" + ("---:|" if after is not None else "")
    lines = [header, rule]
    for name in before:
        value = jax.device_get(before[name])
        row = f"| {name} | {_fmt(value)} |"
        if after is not None:
            row += f" {_fmt(jax.device_get(after[name]))} |"
        lines.append(row)
    return "\n".join(lines)


def _fmt(value) -> str:
    try:
        return f"{float(value):.2f}"
    except TypeError:  # several matrices (heads, scanned layers): show their mean
        return f"{float(value.mean()):.2f} (mean of {value.size})"


def _add_boost_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--beta", type=float, default=None if not required else DEFAULT_BETA,
                        help="Subspace Boosting cutoff in [0, 1] (paper grid "
                        + ", ".join(f"{b:g}" for b in PAPER_BETAS) + ")"
                        + ("" if required else "; omit for no boosting"))
    parser.add_argument("--attn-beta", type=float, default=None,
                        help="cutoff of the attention q/k/v matrices (default: --beta; the authors use 0.10)")
    parser.add_argument("--rank-rtol", type=float, default=None,
                        help="singular values <= RANK_RTOL * s_0 stay zero (defined result on rank-deficient "
                        "matrices); default: raise them like the authors' code")
    parser.add_argument("--mode", choices=BOOST_MODES, default="cumsum", help="cutoff rule (default cumsum)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="per_qkv",
                        help="how attention kernels form matrices (default per_qkv)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _metadata(base_path: str, **provenance: Any) -> dict[str, Any]:
    """The base checkpoint's metadata (architecture) plus how this one was made."""
    from subboost.checkpoints import checkpoint_info

    info = dict(checkpoint_info(base_path) or {}) if Path(base_path).is_dir() else {}
    for key in ("checksums", "content", "merged", "boosted"):  # the new checkpoint's own
        info.pop(key, None)
    info.update(provenance)
    return info


def _warn_rank(report: Any) -> None:
    """One line on stderr naming rank-deficient matrices whose boost is basis-dependent."""
    line = report.rank_warning()
    if line:
        print(line.replace("set rank_rtol", "pass --rank-rtol"), file=sys.stderr)


def _check_arguments(args: argparse.Namespace, inputs: list[str]) -> dict[str, Any]:
    """Every argument and the output path, checked before anything is loaded or computed."""
    from subboost.outputs import check_output
    from subboost.validation import check_real

    if getattr(args, "alpha", None) is not None:
        check_real("--alpha", args.alpha, what=args.command)
    if args.beta is not None:
        check_real("--beta", args.beta, what=args.command, low=0.0, high=1.0)
    if args.attn_beta is not None:
        check_real("--attn-beta", args.attn_beta, what=args.command, low=0.0, high=1.0)
    if args.rank_rtol is not None:
        check_real("--rank-rtol", args.rank_rtol, what=args.command, low=0.0, high=1.0, low_open=True,
                   high_open=True)
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, name="--out")
    kwargs = dict(parse_param(p) for p in getattr(args, "param", []))
    if args.command == "merge":
        from subboost.merging import check_arguments, method_record

        method_record(args.method)
        if args.method == "dare" and "key" not in kwargs:
            kwargs["key"] = jax.random.key(args.seed)
        check_arguments(args.method, kwargs, len(args.experts))
    return kwargs


def run_merge(args: argparse.Namespace) -> int:
    from subboost.checkpoints import load_base_and_experts, save_params

    kwargs = _check_arguments(args, [args.base, *args.experts])
    base, tvs = load_base_and_experts(args.base, args.experts)
    tau = sb.merge(tvs, args.method, **kwargs)
    before = sb.stable_rank(tau, attention=args.attention)
    after = None
    if args.beta is not None:
        tau, report = sb.subspace_boost(tau, beta=args.beta, mode=args.mode, attention=args.attention,
                                        attn_beta=args.attn_beta, rank_rtol=args.rank_rtol, return_info=True)
        _warn_rank(report)
        after = sb.stable_rank(tau, attention=args.attention)
    save_params(sb.apply_task_vector(base, tau, alpha=args.alpha), args.out, overwrite=args.overwrite,
                inputs=[args.base, *args.experts], content="params",
                metadata=_metadata(args.base, merged={"experts": list(args.experts), "method": args.method,
                                                      "hyper_parameters": {k: v for k, v in kwargs.items() if k != "key"},
                                                      "alpha": args.alpha, "beta": args.beta, "mode": args.mode,
                                                      "attn_beta": args.attn_beta, "rank_rtol": args.rank_rtol}))
    print(stable_rank_table(before, after))
    print(f"wrote {args.out}: base + {args.alpha} * {args.method}"
          + (f" boosted (beta={args.beta}, {args.mode})" if args.beta is not None else ""))
    return 0


def run_boost(args: argparse.Namespace) -> int:
    from subboost.checkpoints import load_base_and_experts, save_params

    _check_arguments(args, [args.base, args.merged])
    # merged - base = alpha * tau, and boost(alpha * tau) = alpha * boost(tau).
    base, tvs = load_base_and_experts(args.base, [args.merged], role="the merged checkpoint")
    tau = jax.tree_util.tree_map(lambda x: x[0], tvs)
    before = sb.stable_rank(tau, attention=args.attention)
    boosted, report = sb.subspace_boost(tau, beta=args.beta, mode=args.mode, attention=args.attention,
                                        attn_beta=args.attn_beta, rank_rtol=args.rank_rtol, return_info=True)
    _warn_rank(report)
    save_params(sb.apply_task_vector(base, boosted, alpha=1.0), args.out, overwrite=args.overwrite,
                inputs=[args.base, args.merged], content="params",
                metadata=_metadata(args.base, boosted={"merged": args.merged, "beta": args.beta, "mode": args.mode,
                                                       "attn_beta": args.attn_beta, "rank_rtol": args.rank_rtol}))
    print(stable_rank_table(before, sb.stable_rank(boosted, attention=args.attention)))
    print(f"wrote {args.out}: base + boost(merged - base), beta={args.beta}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    merge = add_command(subparsers, "merge", help="merge expert checkpoints (optionally with Subspace Boosting)", doc=__doc__)
    merge.add_argument("experts", nargs="+", help="expert checkpoint directories")
    merge.add_argument("--base", required=True, help="pretrained checkpoint directory")
    add_merge_method_arguments(merge, methods=sb.available_methods())
    merge.add_argument("--alpha", type=float, default=1.0, help="scaling of the merged task vector")
    _add_boost_flags(merge, required=False)
    merge.set_defaults(func=run_merge)

    boost = add_command(subparsers, "boost", help="apply Subspace Boosting to a merged checkpoint", doc=__doc__)
    boost.add_argument("merged", help="merged checkpoint directory")
    boost.add_argument("--base", required=True, help="pretrained checkpoint directory")
    _add_boost_flags(boost, required=True)
    boost.set_defaults(func=run_boost)
