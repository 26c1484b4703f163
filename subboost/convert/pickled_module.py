"""Whole pickled modules (``torch.save(image_encoder)``) -> state dict + architecture hints.

Task-vector codebases save ``ImageEncoder`` / ``ClassificationHead`` objects whole. They are
read with `subboost.convert.torch_pickle` (stand-ins, no code executed); the tensors come out
under ``nn.Module.state_dict()`` names (``model.visual.conv1.weight``, ...) and go through
the open_clip / head converters. What the weights cannot tell is read off the stand-ins'
attributes: ``num_heads`` of the attention modules and the MLP activation's class
(``QuickGELU`` or ``nn.GELU``).
"""

from __future__ import annotations

from typing import Any

from subboost.convert.common import ConversionError
from subboost.convert.torch_pickle import StandIn, find_modules, module_attribute


def architecture_hints(module: StandIn, *, source: str) -> dict[str, Any]:
    """``{"heads": ..., "act": ...}`` as far as the pickled module shows them."""
    hints: dict[str, Any] = {}
    heads = {_head_count(m, source) for m in find_modules(module, "MultiheadAttention")}
    heads.discard(None)
    if len(heads) == 1:
        hints["heads"] = heads.pop()
    elif len(heads) > 1:
        # the text tower may use another head count; take the visual tower's
        visual = [m for m in find_modules(module, "VisionTransformer")]
        visual_heads = {_head_count(m, source) for v in visual for m in find_modules(v, "MultiheadAttention")}
        visual_heads.discard(None)
        if len(visual_heads) == 1:
            hints["heads"] = visual_heads.pop()
    root = (find_modules(module, "VisionTransformer") or [module])[0]
    if find_modules(root, "QuickGELU"):
        hints["act"] = "quick_gelu"
    else:
        gelus = find_modules(root, "GELU")
        approximations = {module_attribute(g, "approximate", "none") for g in gelus}
        if approximations == {"none"}:
            hints["act"] = "gelu"
        elif approximations:
            raise ConversionError(f"{source}: GELU with approximate={sorted(approximations)} is not supported.")
    return hints


def _head_count(attention: StandIn, source: str) -> int | None:
    """``num_heads`` of a pickled ``nn.MultiheadAttention``: a positive int, or an error naming the file."""
    value = module_attribute(attention, "num_heads")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(
            f"{source}: a pickled MultiheadAttention has num_heads={value!r}, not a positive integer; "
            "the file is damaged or not a CLIP model."
        )
    return value


def head_normalize(module: StandIn) -> bool | None:
    value = module_attribute(module, "normalize")
    return None if value is None else bool(value)
