"""open_clip / OpenAI CLIP ``state_dict`` -> `CLIPVisionTransformer` parameters.

Accepted key layouts (``P`` is any wrapper prefix, e.g. ``""``, ``"model."``, ``"module."``):

* the visual tower alone: ``P conv1.weight``, ``P transformer.resblocks.{i}...``, ``P proj``;
* a full CLIP model: ``P visual.conv1.weight``, ...; its text tower (``P token_embedding``,
  ``P positional_embedding``, ``P transformer.*``, ``P ln_final.*``, ``P text_projection``,
  ``P logit_scale``, ...) is recognised and deliberately not converted; any other key is an
  error.

open_clip's ``proj`` is already ``(width, embed_dim)`` and used as ``x @ proj``: copied as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from subboost.convert.common import (
    ConversionError,
    TensorSource,
    count_blocks,
    fused_attention,
    resolve_config,
    vision_blocks,
    vision_tower,
)
from subboost.models.clip_vit import CLIPVisionConfig

ANCHOR = "conv1.weight"
# Keys of the text tower (relative to the full model's prefix), not converted.
TEXT_TOWER_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale",
                   "logit_bias", "attn_mask", "input_resolution", "context_length", "vocab_size")
TEXT_TOWER_PREFIXES = ("transformer.", "ln_final.", "text.")


def find_prefix(names: list[str], source: str) -> str:
    """The key prefix of the visual tower (``""``, ``"visual."``, ``"model.visual."``, ...)."""
    anchors = [n for n in names if n == ANCHOR or n.endswith("." + ANCHOR)]
    if not anchors:
        raise ConversionError(
            f"{source}: no '{ANCHOR}' key: not an open_clip / OpenAI CLIP vision tower "
            f"(first keys: {sorted(names)[:5]})."
        )
    if len(anchors) > 1:
        raise ConversionError(f"{source}: several vision towers ({anchors}); convert one at a time.")
    return anchors[0][: -len(ANCHOR)]


def is_open_clip(names: list[str]) -> bool:
    return any(n == ANCHOR or n.endswith("." + ANCHOR) for n in names)


def infer_architecture(tensors: Mapping[str, np.ndarray], prefix: str, source: str) -> dict[str, int]:
    src = TensorSource(tensors, source=source, prefix=prefix)
    conv = src.shape(ANCHOR)
    if conv is None or len(conv) != 4 or conv[2] != conv[3]:
        raise ConversionError(f"{source}: {prefix + ANCHOR!r} has shape {conv}, expected (width, channels, p, p).")
    width, in_channels, patch = conv[0], conv[1], conv[2]
    pos = src.shape("positional_embedding")
    if pos is None:
        raise ConversionError(f"{source}: missing keys ['{prefix}positional_embedding'] (needed to infer the image size).")
    grid = int(round((pos[0] - 1) ** 0.5))
    if len(pos) != 2 or grid * grid + 1 != pos[0]:
        raise ConversionError(
            f"{source}: {prefix + 'positional_embedding'!r} has shape {pos}; expected (grid**2 + 1, width)."
        )
    layers = count_blocks(tensors, prefix + "transformer.resblocks.", source=source)
    if layers == 0:
        raise ConversionError(f"{source}: no '{prefix}transformer.resblocks.{{i}}.*' keys: no transformer blocks.")
    fc = src.shape("transformer.resblocks.0.mlp.c_fc.weight")
    proj = src.shape("proj")
    return {
        "image_size": grid * patch,
        "patch_size": patch,
        "width": width,
        "layers": layers,
        "embed_dim": proj[1] if proj is not None and len(proj) == 2 else width,
        "in_channels": in_channels,
        "mlp_dim": fc[0] if fc is not None else 4 * width,
    }


# Where the Flax tower's parameters sit in an open_clip visual tower (mostly the same names).
OPEN_CLIP_NAMES = {"conv1": "conv1.weight", "class_embedding": "class_embedding",
                   "positional_embedding": "positional_embedding", "ln_pre": "ln_pre", "ln_post": "ln_post",
                   "resblocks": "transformer.resblocks.", "ln_1": "ln_1", "attn": "attn", "ln_2": "ln_2",
                   "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}


def convert_state_dict(
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    what: str = "state_dict",
    config: CLIPVisionConfig | str | None = None,
    hints: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict, CLIPVisionConfig, dict[str, Any]]:
    """``(params, config, info)`` from an open_clip-layout state dict of numpy arrays."""
    names = list(tensors)
    prefix = find_prefix(names, source)
    inferred = infer_architecture(tensors, prefix, source)
    cfg, notes = resolve_config(inferred, source=source, config=config, hints=hints, overrides=overrides)
    src = TensorSource(tensors, source=source, prefix=prefix, what=f"open_clip {what}")
    blocks = vision_blocks(src, cfg, OPEN_CLIP_NAMES, attention=fused_attention)
    params = vision_tower(src, cfg, OPEN_CLIP_NAMES, blocks=blocks, proj="proj")
    ignored: list[str] = []
    if prefix.endswith("visual."):  # a full CLIP model: its text tower is known and left out
        outer = prefix[: -len("visual.")]
        ignored = src.ignore(
            lambda k: k.startswith(outer)
            and (k[len(outer):] in TEXT_TOWER_KEYS or k[len(outer):].startswith(TEXT_TOWER_PREFIXES))
        )
    src.finish()
    info = {
        "layout": "full CLIP model (text tower not converted)" if ignored else "visual tower",
        "key_prefix": prefix,
        "ignored_keys": len(ignored),
        "notes": notes,
    }
    return params, cfg, info
