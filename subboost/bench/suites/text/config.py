"""Text-suite configurations: ``tiny`` (CI, < 2 min) and ``default`` (the README's run).

``default``: all-MiniLM-L6-v2 (6 blocks, width 384), 12 generated sentence tasks, one
expert per task fine-tuned for `finetune_steps` AdamW steps on the transformer blocks
(embeddings frozen), merged at 4 / 8 / 12 tasks.

``tiny``: the first block of the same pretrained weights, the first 4 tasks merged at 2 / 4,
fewer sentences and steps, a shorter alpha grid and four methods (Task Arithmetic, TIES,
TSV-M, Iso-C: element-wise and SVD-based): every stage of the pipeline, for CI.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from subboost import grids
from subboost.bench.settings import DEFAULT_FIXED_ALPHAS, DEFAULT_METHOD_KWARGS, check_suite_settings

# Log-spaced alpha grid 0.125 .. 2 (refined by 2^(+-1/2) around the best; edges flagged).
DEFAULT_ALPHAS: tuple[float, ...] = grids.TEXT_ALPHAS
DEFAULT_BETAS: tuple[float, ...] = grids.PAPER_BETAS
# Temperature of the frozen cosine-prototype heads: fixed, not tuned (20 is the scale
# sentence-transformers uses for cosine-similarity losses).
LOGIT_SCALE = 20.0


@dataclasses.dataclass(frozen=True)
class TextBenchConfig:
    """One text-suite size.

    Attributes:
      name: ``"tiny"`` or ``"default"``.
      layers: transformer blocks of the pretrained encoder kept (None: all).
      num_tasks: tasks used (the first ones of `generators.TASKS`).
      task_counts: numbers of experts merged (prefixes of the task order).
      train_per_task, val_per_task, test_per_task: sentences per task and split.
      head_shots: sentences per class whose pretrained embeddings make the frozen prototype head.
      max_length: most tokens per sentence ([CLS] and [SEP] included).
      logit_scale: temperature of the prototype heads.
      finetune_steps, finetune_batch, finetune_lr, finetune_warmup: per-expert AdamW
        fine-tuning of the transformer blocks (no weight decay; warm-up then cosine decay;
        global-norm clip 1); embeddings and heads frozen.
      steps_per_call: optimisation steps fused into one jit-compiled `lax.scan`.
      eval_batch: sentences per forward pass in evaluation.
      finetune_label_noise: fraction of training labels replaced by another class before fine-tuning
        (`subboost.bench.label_noise.corrupt_labels`; heads, validation and test stay clean). 0 leaves the
        training key as it was.
      task_set: ``"standard"`` (the 12 of `generators.TASKS`) or ``"many"`` (those, then the variants of
        `subboost.bench.suites.text.task_variants`) or ``"real"`` (labelled sentences,
        `subboost.bench.suites.text.real_tasks`); ``num_tasks`` takes the first ones. ``"standard"`` leaves the
        training key as it was.
      data_dir: the prepared real task files (``task_set="real"``; default
        `subboost.text_data.tasks.default_data_dir`). Not part of the training key: the files' settings are.
      methods, method_kwargs, fixed_alphas, alphas, betas, sweep_methods, sweep_betas: as in
        `subboost.bench.suites.vision.config.BenchConfig` (no boosting sweep by default).
    """

    suite: ClassVar[str] = "text"  # the registered suite that runs this config
    name: str
    layers: int | None
    num_tasks: int
    task_counts: tuple[int, ...]
    train_per_task: int
    val_per_task: int
    test_per_task: int
    head_shots: int
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    finetune_warmup: int
    max_length: int = 16
    logit_scale: float = LOGIT_SCALE
    steps_per_call: int = 25
    eval_batch: int = 256
    finetune_label_noise: float = 0.0
    task_set: str = "standard"
    data_dir: str | None = None
    methods: tuple[str, ...] | None = None
    method_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_METHOD_KWARGS))
    fixed_alphas: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_FIXED_ALPHAS))
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    betas: tuple[float, ...] = DEFAULT_BETAS
    sweep_methods: tuple[str, ...] = ()
    sweep_betas: tuple[float, ...] = grids.BOOST_SWEEP_BETAS

    def __post_init__(self):
        from subboost.bench.suites.text.task_variants import task_set

        check_suite_settings(self, available_tasks=len(task_set(self.task_set)))
        if not 0.0 <= self.finetune_label_noise < 1.0:
            raise ValueError(f"TextBenchConfig.finetune_label_noise must lie in [0, 1), got {self.finetune_label_noise}.")
        if self.head_shots * 4 > self.train_per_task:
            raise ValueError(f"TextBenchConfig.head_shots={self.head_shots} is too many for train_per_task={self.train_per_task}.")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"TextBenchConfig.layers must be positive or None, got {self.layers}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_key(self, seed: int, weights_sha256: str) -> str:
        """Hash of everything that decides the heads and experts (incl. the generators' and trainers' source).

        The label noise and the task set (and their modules' source) enter only when they differ from their
        defaults, so the standard suite's keys are those from before they existed.
        """
        from subboost.bench.cache import source_key, with_options
        from subboost.bench.suites.text import finetune, generators, model, prototype_heads, splits, task_variants, tokenize

        fields = {k: v for k, v in self.to_dict().items()
                  if k.startswith(("layers", "num_tasks", "train_", "finetune_", "head_", "max_length", "logit_",
                                   "steps_per_call"))}
        fields, modules = with_options(self, fields, (generators, splits, model, finetune, prototype_heads, tokenize),
                                       task_variants)
        if self.task_set == "real":  # the prepared data: their settings' key and the modules that split them
            from subboost.bench.suites.text import real_tasks
            from subboost.text_data import tasks as text_data_tasks

            fields["real_data"] = text_data_tasks.spec_key()
            modules = [*modules, real_tasks, text_data_tasks]
        return source_key({"seed": seed, "weights": weights_sha256, "config": fields}, modules)


CONFIGS: dict[str, TextBenchConfig] = {
    "default": TextBenchConfig(
        name="default", layers=None, num_tasks=12, task_counts=(4, 8, 12),
        train_per_task=1024, val_per_task=24, test_per_task=96, head_shots=8,
        finetune_steps=30, finetune_batch=32, finetune_lr=1e-4, finetune_warmup=3, steps_per_call=15,
    ),
    # Real labelled sentences (`subboost.text_data`): 11 tasks from six domains. Fine-tuning settings not yet
    # calibrated against the expert targets (docs/text.md says what was measured).
    "real": TextBenchConfig(
        name="real", layers=None, num_tasks=11, task_counts=(4, 8, 11), task_set="real",
        train_per_task=1024, val_per_task=64, test_per_task=200, head_shots=8, max_length=40,
        finetune_steps=100, finetune_batch=32, finetune_lr=1e-4, finetune_warmup=10, steps_per_call=25,
    ),
    "tiny": TextBenchConfig(
        name="tiny", layers=1, num_tasks=4, task_counts=(2, 4),
        train_per_task=128, val_per_task=16, test_per_task=32, head_shots=4,
        finetune_steps=30, finetune_batch=16, finetune_lr=3e-4, finetune_warmup=4, steps_per_call=10,
        eval_batch=128, alphas=(0.5, 1.0, 2.0), betas=(0.0, 0.02),
        methods=("task_arithmetic", "ties", "tsv", "iso_c"),
    ),
}


def get_config(size: str = "default", **overrides: Any) -> TextBenchConfig:
    """The named size (``"tiny"`` or ``"default"``), with fields replaced by ``overrides``."""
    if size not in CONFIGS:
        raise ValueError(f"unknown text-suite size {size!r}; choose one of {', '.join(CONFIGS)}.")
    return dataclasses.replace(CONFIGS[size], **overrides)
