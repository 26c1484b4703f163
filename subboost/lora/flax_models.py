"""Merged LoRA updates as task vectors of subboost's Flax models (CLIP ViT, BERT).

Adapters name Hugging Face modules (``encoder.layer.0.attention.self.query``);
subboost's Flax models hold the same weights transposed (kernels ``(in, out)``),
split into heads (``(embed, heads, head_dim)``) or fused, as the converters of
`subboost.convert` lay them out. Those conversions are linear in the weights up
to constants (a CLIPVisionModel's identity projection), so the Flax task vector is::

    tau_flax = convert(base + alpha * updates) - convert(base)

computed in float32 from the Hugging Face base directory the Flax model was
converted from. Every layout the converter knows (per-head q/k/v, fused
``in_proj``) follows without a second table of names.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from subboost.errors import SubboostError
from subboost.lora.merge import LoraMerge, apply_merge
from subboost.tree import PyTree


def _convert(tensors: dict[str, np.ndarray], hf_config: dict, source: str) -> PyTree:
    from subboost.convert import bert, hf

    if bert.is_bert_config(hf_config):
        return bert.convert_state_dict(tensors, source=source, hf_config=hf_config)[0]
    if hf.is_hf_state(list(tensors)):
        return hf.convert_state_dict(tensors, source=source, hf_config=hf_config)[0]
    raise SubboostError(f"{source}: neither a BERT nor a CLIP vision model: no Flax model of subboost's "
                        "matches it (merge onto the Hugging Face tensors with apply_merge instead).")


def flax_task_vector(merged: LoraMerge, hf_dir: str | os.PathLike, *, alpha: float = 1.0) -> PyTree:
    """``alpha`` times the merged updates as a task vector of the Flax model converted from ``hf_dir``.

    Args:
      merged: a `subboost.lora.LoraMerge`.
      hf_dir: the Hugging Face model directory the adapters were trained on (the
        one `subboost.convert` turned into the Flax model).
      alpha: scaling of the merged updates.

    Returns:
      A pytree with the Flax model's structure: add it with
      `subboost.apply_task_vector(flax_params, tau)`.
    """
    from subboost.convert import hf

    path = Path(hf_dir)
    if not hf.is_hf_dir(path):
        raise SubboostError(f"{path}: not a Hugging Face model directory (config.json and weights).")
    hf_config = hf.read_config(path)
    tensors, _ = hf.load_dir(path)
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    updated = apply_merge(tensors, merged, alpha=alpha, base_name=f"base {path}")
    source = str(path)
    return jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                  _convert(updated, hf_config, source), _convert(tensors, hf_config, source))


__all__ = ["flax_task_vector"]
