"""`load_model`: a subboost checkpoint as a runnable ``(flax module, params)`` pair.

The converters record what a checkpoint holds in its ``subboost.json`` (``kind`` and
``architecture``); this reads it back and rebuilds the matching module:

* ``clip_vision`` -> `CLIPVisionTransformer`: ``module.apply({"params": p}, images)`` -> ``(B, embed_dim)``;
* ``bert`` -> `BertEncoder`: ``module.apply({"params": p}, input_ids, attention_mask)`` -> ``(B, L, width)``;
* ``classification_head`` -> `ClassificationHead`: ``module.apply({"params": p}, features)`` -> logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn

from subboost.errors import SubboostError


def module_for(kind: str, architecture: dict[str, Any], *, source: str = "checkpoint") -> nn.Module:
    """The flax module of a ``(kind, architecture)`` pair as written to ``subboost.json``."""
    from subboost.models.bert import BertConfig, BertEncoder
    from subboost.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
    from subboost.models.heads import ClassificationHead

    try:
        if kind == "clip_vision":
            return CLIPVisionTransformer(CLIPVisionConfig.from_dict(architecture))
        if kind == "bert":
            return BertEncoder(BertConfig.from_dict(architecture))
        if kind == "classification_head":
            return ClassificationHead(num_classes=int(architecture["num_classes"]),
                                      normalize=bool(architecture.get("normalize", True)))
    except (TypeError, ValueError, KeyError) as err:
        raise SubboostError(f"{source}: invalid {kind} architecture in subboost.json ({err}).") from err
    raise SubboostError(
        f"{source}: unknown model kind {kind!r} in subboost.json; expected clip_vision, bert or classification_head."
    )


def load_model(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Loads a checkpoint written by `subboost.convert` (or `save_params` with its metadata).

    Args:
      path: the checkpoint directory (with ``subboost.json``).

    Returns:
      ``(module, params)``; ``module.apply({"params": params}, ...)`` runs the model.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      SubboostError: no ``subboost.json`` (the architecture is unknown), or an unknown kind.
    """
    from subboost.checkpoints import checkpoint_info, load_params

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    info = checkpoint_info(path) if path.is_dir() else None
    if info is None or "kind" not in info or "architecture" not in info:
        raise SubboostError(
            f"{path}: no subboost.json with 'kind' and 'architecture', so the model is unknown; "
            "load the parameters alone with subboost.load_params."
        )
    module = module_for(info["kind"], info["architecture"], source=str(path))
    return module, load_params(path)
