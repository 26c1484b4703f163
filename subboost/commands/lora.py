"""``subboost merge`` with PEFT LoRA adapter directories as experts.

Examples::

  # Iso-CTS of three adapters, boosted, added to a Hugging Face base: a full model
  subboost merge --base bert_dir adapter_a adapter_b adapter_c --method iso_cts --beta 0.02 \\
      --alpha 1.0 --out merged_model

  # the same merge as a new rank-16 adapter (truncated SVD; relative error per module printed)
  subboost merge --base bert_dir adapter_a adapter_b adapter_c --method task_arithmetic \\
      --adapter-rank 16 --out merged_adapter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from subboost.checkpoint_io.peft_adapters import is_adapter_dir
from subboost.errors import SubboostError

def adapter_experts(experts: list[str]) -> bool:
    """True when the experts are adapter directories; all or none of them must be."""
    kinds = [is_adapter_dir(e) for e in experts]
    if any(kinds) and not all(kinds):
        other = experts[kinds.index(False)]
        raise SubboostError(f"{other}: not a PEFT adapter directory, but other experts are; "
                            "merge adapters with adapters, checkpoints with checkpoints.")
    return all(kinds)


def check_adapter_rank(args: argparse.Namespace) -> bool:
    """Whether ``subboost merge`` merges adapters; ``--adapter-rank`` checked (adapters only, positive)."""
    adapters = adapter_experts(args.experts)
    rank = getattr(args, "adapter_rank", None)
    if rank is not None and not adapters:
        raise SubboostError("merge: --adapter-rank applies only when the experts are PEFT adapter directories.")
    if rank is not None and rank < 1:
        raise SubboostError(f"merge: --adapter-rank must be a positive integer, got {rank}.")
    return adapters


def open_base(base: str):
    """A reader of the base: a Hugging Face model directory (any layout), or one ``.safetensors`` file."""
    from subboost.checkpoint_io.huggingface import HuggingFaceReader, is_huggingface_dir
    from subboost.checkpoint_io.readers import SafetensorsReader

    path = Path(base)
    if is_huggingface_dir(path):
        return HuggingFaceReader(path)
    if path.is_file() and path.suffix == ".safetensors":
        return SafetensorsReader(path)
    raise SubboostError(f"--base {base}: adapters merge onto a Hugging Face model directory or a .safetensors "
                        "file of tensors named like the adapted model's.")


def _print_errors(errors: dict[str, float]) -> None:
    values = np.array(list(errors.values()))
    worst = max(errors, key=errors.get)
    print(f"adapter rank truncation: relative error mean {values.mean():.3g}, max {values.max():.3g} ({worst})")


def run_merge_adapters(args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    """``subboost merge`` when every expert is an adapter directory (arguments already checked)."""
    from subboost.checkpoint_io.huggingface import HuggingFaceReader, HuggingFaceWriter, parse_size
    from subboost.checkpoint_io.safetensors_format import SafetensorsWriter
    from subboost.lora import map_modules, merge_adapters, save_adapter
    from subboost.outputs import staged_output

    if args.attn_beta is not None or args.attention != "per_qkv":
        raise SubboostError("merge: --attn-beta and --attention do not apply to adapters (each adapted module is "
                            "its own matrix).")
    shard_bytes = parse_size(args.shard_size)
    reader = open_base(args.base)
    merged = merge_adapters(args.experts, args.method, beta=args.beta, mode=args.mode or "cumsum", rank_rtol=args.rank_rtol,
                            **kwargs)
    shapes = {name: spec.shape for name, spec in reader.specs.items()}
    mapping = map_modules(merged.template.modules, shapes, source=merged.template.source,
                          base_name=f"base {args.base}")
    how = f"{args.method}" + (" (factored)" if merged.factored else " (dense)") + (
        f" boosted (beta={args.beta}, {args.mode})" if args.beta is not None else "")
    if args.adapter_rank is not None:
        errors = save_adapter(merged, args.out, rank=args.adapter_rank, alpha=args.alpha, overwrite=args.overwrite)
        _print_errors(errors)
        print(f"wrote {args.out}: a rank-{args.adapter_rank} adapter of {args.alpha} * {how}")
        return 0
    module_of = {tensor: module for module, tensor in mapping.items()}
    specs = {name: (tuple(spec.shape), np.dtype(spec.dtype)) for name, spec in reader.specs.items()}
    with staged_output(args.out, overwrite=args.overwrite, inputs=[args.base, *args.experts], name="--out") as built:
        if isinstance(reader, HuggingFaceReader):  # shards, passed-through tensors, config and tokenizer files
            writer = HuggingFaceWriter(built, reader, specs, shard_bytes=shard_bytes)
        else:
            writer = SafetensorsWriter(built / Path(args.base).name, specs, metadata={"format": "pt"})
        try:
            for name in specs:  # one tensor in memory at a time
                weight = reader.read([name])[name]
                if name in module_of:
                    delta = merged.update(module_of[name])
                    weight = (weight.astype(np.float32) + float(args.alpha) * delta).astype(weight.dtype)
                writer.write(name, weight)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (built / "lora_merge.json").write_text(json.dumps({
            "method": args.method, "factored": merged.factored, "beta": args.beta, "alpha": args.alpha,
            "base": args.base, "adapters": list(args.experts)}, indent=2) + "\n")
    print(f"wrote {args.out}: base + {args.alpha} * {how}")
    return 0
