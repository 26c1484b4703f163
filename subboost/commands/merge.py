"""``subboost merge`` and ``subboost boost``: merge checkpoints from the command line.

Examples::

  # TIES-merge three experts, boost with beta = 0.02, write base + 0.3 * tau
  subboost merge --base base_ckpt expert_a expert_b expert_c \\
      --method ties --param k=0.2 --beta 0.02 --alpha 0.3 --out merged_ckpt

  # Task Arithmetic, calibrated by SVC for alpha 0.3, then boosted (post-merge operators, left to right)
  subboost merge --base base_ckpt expert_a expert_b expert_c --alpha 0.3 \\
      --post svc:min_projection=0.1,merge_coefficient=0.3 --post boost:beta=0.02 --out merged_ckpt

  # boost an already merged model (boosting commutes with the alpha scaling)
  subboost boost merged_ckpt --base base_ckpt --beta 0.02 --out boosted_ckpt

  # Hugging Face model directories (any architecture): streamed, written back as one
  subboost merge --base Qwen2-0.5B qwen-math qwen-code --method ties --param k=0.2 \\
      --alpha 1.0 --shard-size 2GB --out merged-qwen
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax

import subboost as sb
from subboost.boosting import BOOST_MODES
from subboost.commands.common import add_command, add_merge_method_arguments, merge_method_kwargs
from subboost.errors import SubboostError
from subboost.grids import DEFAULT_BETA, PAPER_BETAS
from subboost.streaming.chunks import DEFAULT_CHUNK_BYTES
from subboost.tree import ATTENTION_MODES


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
                        help="cutoff of the attention q/k/v matrices (default: --beta; the authors use 0.10)"
                        + ("" if required else "; needs --beta"))
    parser.add_argument("--rank-rtol", type=float, default=None,
                        help="singular values <= RANK_RTOL * s_0 stay zero (defined result on rank-deficient "
                        "matrices); default: raise them like the authors' code" + ("" if required else "; needs --beta"))
    parser.add_argument("--mode", choices=BOOST_MODES, default=None,
                        help="cutoff rule (default cumsum)" + ("" if required else "; needs --beta"))
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

    if args.command == "merge" and args.alpha is None:
        raise SubboostError("--alpha is required: the scaling of the merged task vector has no default (choose it "
                            "on validation data, e.g. the best of 0.1, 0.2, ..., 1.0).")
    if getattr(args, "alpha", None) is not None:
        check_real("--alpha", args.alpha, what=args.command)
    if args.beta is None:
        unused = [flag for flag, value in (("--attn-beta", args.attn_beta), ("--rank-rtol", args.rank_rtol),
                                           ("--mode", args.mode)) if value is not None]
        if unused:
            raise SubboostError(f"{', '.join(unused)} only apply to boosting: pass --beta too, or drop them.")
    else:
        check_real("--beta", args.beta, what=args.command, low=0.0, high=1.0)
        args.mode = args.mode or "cumsum"
    if args.attn_beta is not None:
        check_real("--attn-beta", args.attn_beta, what=args.command, low=0.0, high=1.0)
    if args.rank_rtol is not None:
        check_real("--rank-rtol", args.rank_rtol, what=args.command, low=0.0, high=1.0, low_open=True,
                   high_open=True)
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, name="--out")
    if args.command != "merge":
        return {}
    from subboost.merging import check_arguments

    kwargs = merge_method_kwargs(args)
    check_arguments(args.method, kwargs, len(args.experts))
    return kwargs


def run_merge_huggingface(args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    """A Hugging Face base: `subboost.streaming.merge_from_checkpoints` writes a Hugging Face directory."""
    from subboost.streaming import merge_from_checkpoints

    boost = None if args.beta is None else {
        "beta": args.beta, "mode": args.mode, "attention": args.attention, "attn_beta": args.attn_beta,
        "rank_rtol": args.rank_rtol}
    out = merge_from_checkpoints(args.base, args.experts, method=args.method, boost=boost, out=args.out,
                                 alpha=args.alpha, overwrite=args.overwrite, chunk_bytes=args.chunk_bytes,
                                 shard_size=args.shard_size, progress=sys.stderr.isatty(), **kwargs)
    info = json.loads((out / "merge_info.json").read_text())
    copied, tied = info.get("passed_through", []), info.get("tied_not_written", {})
    if copied or tied:  # what was not merged, said once
        print(f"not merged: {len(copied)} tensor(s) copied from the base ({', '.join(copied[:4])}"
              f"{', ...' if len(copied) > 4 else ''}); {len(tied)} tied copy(ies) left to transformers "
              f"({', '.join(tied)})", file=sys.stderr)
    print(f"wrote {args.out} (Hugging Face directory): base + {args.alpha} * {args.method}"
          + (f" boosted (beta={args.beta}, {args.mode})" if args.beta is not None else ""))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from subboost.checkpoint_io.huggingface import is_huggingface_dir, parse_size
    from subboost.checkpoints import load_base_and_experts, save_params

    from subboost.commands.lora import check_adapter_rank, run_merge_adapters

    kwargs = _check_arguments(args, [args.base, *args.experts])
    post = sb.post.parse(args.post) if args.post else None  # bad operators refused before loading
    adapters = check_adapter_rank(args)  # PEFT LoRA adapters as experts
    streamed = "a pod (--distributed)" if jax.process_count() > 1 else (
        "LoRA adapters" if adapters else "a Hugging Face base" if is_huggingface_dir(args.base) else None)
    if post is not None and streamed:
        raise SubboostError(f"--post is not available with {streamed} (these merges apply no post-merge "
                            "operators yet); use --beta for boosting, or merge full checkpoints in memory.")
    if jax.process_count() > 1:  # a pod (--distributed): every process streams its share
        return _run_merge_on_processes(args, kwargs)
    if adapters:
        return run_merge_adapters(args, kwargs)
    if is_huggingface_dir(args.base):
        parse_size(args.shard_size)  # checked before anything is read
        return run_merge_huggingface(args, kwargs)
    base, tvs = load_base_and_experts(args.base, args.experts)
    tau = sb.merge(tvs, args.method, **kwargs)
    if post is not None:
        tau = post(tau, task_vectors=tvs, pretrained=base)
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
                                                      "attn_beta": args.attn_beta, "rank_rtol": args.rank_rtol,
                                                      "post": post.name if post is not None else None}))
    print(stable_rank_table(before, after))
    print(f"wrote {args.out}: base + {args.alpha} * {args.method}"
          + (f" boosted (beta={args.beta}, {args.mode})" if args.beta is not None else ""))
    return 0


def _run_merge_on_processes(args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    """`subboost.streaming.pod`: writes a streaming merge directory (shards + index), readable by `load_params`."""
    boost = None if args.beta is None else {"beta": args.beta, "mode": args.mode, "attention": args.attention,
                                            "attn_beta": args.attn_beta, "rank_rtol": args.rank_rtol}
    sb.merge_from_checkpoints(args.base, args.experts, method=args.method, boost=boost, out=args.out,
                              alpha=args.alpha, overwrite=args.overwrite, progress=jax.process_index() == 0, **kwargs)
    if jax.process_index() == 0:
        print(f"wrote {args.out}: base + {args.alpha} * {args.method}"
              + (f" boosted (beta={args.beta}, {args.mode})" if args.beta is not None else "")
              + f", {jax.process_count()} processes")
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
    merge.add_argument("--alpha", type=float, default=None,
                       help="scaling of the merged task vector (required: no default; choose it on validation data)")
    merge.add_argument("--adapter-rank", type=int, default=None,
                       help="experts are PEFT LoRA adapters: write a new adapter of this rank, not a full model")
    merge.add_argument("--shard-size", default="5GB",
                       help="Hugging Face base: the largest safetensors shard written (default 5GB)")
    merge.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                       help="Hugging Face base: bytes of one streamed chunk over all experts (the memory knob)")
    merge.add_argument("--post", action="append", default=[], metavar="OP:NAME=VALUE,...",
                       help="post-merge operator applied after the merge, in order (repeatable): "
                       + ", ".join(sb.post.OPERATORS) + "; e.g. svc:min_projection=0.1 or boost:beta=0.02")
    _add_boost_flags(merge, required=False)
    merge.set_defaults(func=run_merge)

    boost = add_command(subparsers, "boost", help="apply Subspace Boosting to a merged checkpoint", doc=__doc__)
    boost.add_argument("merged", help="merged checkpoint directory")
    boost.add_argument("--base", required=True, help="pretrained checkpoint directory")
    _add_boost_flags(boost, required=True)
    boost.set_defaults(func=run_boost)
