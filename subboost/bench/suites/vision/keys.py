"""The vision suite's training key: the name of its model-cache entry (`subboost.bench.cache`)."""

from __future__ import annotations

from subboost.bench.cache import source_key, with_options
from subboost.bench.suites.vision import centroid_heads, finetune, generators, model, pretrain, splits, task_variants
from subboost.bench.suites.vision.base import SHIPPED_BASES
from subboost.bench.suites.vision.config import BenchConfig


def training_key(config: BenchConfig, seed: int) -> str:
    """Hash of everything that decides the trained base, heads and experts of the vision suite.

    Includes the source of the task generators and training code, so editing
    them invalidates cached checkpoints; a shipped base is identified by its checksum.
    The label noise and the task set (and their modules' source) enter only when they
    differ from their defaults, so the standard suite's keys are those from before they existed.
    """
    fields = {
        k: v
        for k, v in config.to_dict().items()
        if k.startswith(("model", "num_tasks", "train_", "pretrain_", "finetune_", "head_", "steps_per_call", "base"))
    }
    modules = [generators, splits, model, pretrain, finetune, centroid_heads]
    if config.base is not None:
        fields["base_sha256"] = SHIPPED_BASES.get(config.base)
    if config.domain_style:  # absent at 0, like the options below
        fields["domain_style"] = config.domain_style
    fields, modules = with_options(config, fields, modules, task_variants)
    return source_key({"seed": seed, "config": fields}, modules)
