"""Flax models: the CLIP image tower, a BERT text encoder and per-task classification heads."""

from subboost.models.clip_vit import (
    CLIPVisionConfig,
    CLIPVisionTransformer,
    available_configs,
    get_config,
    init_params,
    param_shapes,
    quick_gelu,
)
from subboost.models.bert import BertConfig, BertEncoder, mean_pool
from subboost.models.heads import ClassificationHead, head_from_linear, heads_from_class_embeddings, l2_normalize

__all__ = [
    "BertConfig",
    "BertEncoder",
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "ClassificationHead",
    "available_configs",
    "get_config",
    "head_from_linear",
    "heads_from_class_embeddings",
    "init_params",
    "l2_normalize",
    "mean_pool",
    "param_shapes",
    "quick_gelu",
]
