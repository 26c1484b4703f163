"""Merging PEFT LoRA adapters, factored where the method allows (see `subboost.lora.merge`)."""

from subboost.checkpoint_io.peft_adapters import LoraAdapter, LoraModule, read_adapter
from subboost.lora.factored import FACTORED_METHODS
from subboost.lora.flax_models import flax_task_vector
from subboost.lora.merge import (
    LoraMerge,
    MergedUpdate,
    adapter_factors,
    apply_merge,
    map_modules,
    merge_adapters,
    merge_factors,
    save_adapter,
)

__all__ = [
    "FACTORED_METHODS",
    "LoraAdapter",
    "LoraMerge",
    "LoraModule",
    "MergedUpdate",
    "adapter_factors",
    "apply_merge",
    "flax_task_vector",
    "map_modules",
    "merge_adapters",
    "merge_factors",
    "read_adapter",
    "save_adapter",
]
