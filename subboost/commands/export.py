"""``subboost export``: subboost CLIP ViT / BERT checkpoints -> Hugging Face model directories.

Examples::

  # a converted (or merged) CLIP vision tower -> CLIPVisionModelWithProjection
  subboost export merged_ckpt --out merged-hf
  # then: transformers.CLIPVisionModelWithProjection.from_pretrained("merged-hf")
"""

from __future__ import annotations

import argparse

from subboost.commands.common import add_command


def run_export(args: argparse.Namespace) -> int:
    from subboost.convert.to_huggingface import export_huggingface

    out = export_huggingface(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (Hugging Face directory)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "export", help="write a subboost CLIP ViT or BERT checkpoint as a Hugging Face directory",
                         doc=__doc__)
    parser.add_argument("checkpoint", help="subboost checkpoint directory (with subboost.json)")
    parser.add_argument("--out", required=True, help="output Hugging Face directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if subboost wrote it")
    parser.set_defaults(func=run_export)
