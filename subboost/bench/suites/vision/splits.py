"""Stacked arrays of a task suite: one leading task axis, equal sizes per task.

Training splits are stored clean (training adds each task's pixel noise afresh
per step); evaluation splits hold their fixed noisy images. Everything is
float32 in ``[0, 1]``; `subboost.bench.suites.vision.generators.normalise` maps to model input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from subboost.bench.suites.vision.generators import MAX_CLASSES, Task, coarse_labels, generate, num_coarse_labels


@dataclasses.dataclass(frozen=True)
class Split:
    """``images`` (T, n, H, W, 3) float32 in [0, 1]; ``labels`` (T, n) int32."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def num_tasks(self) -> int:
        return self.images.shape[0]

    def take(self, num_tasks: int) -> Split:
        """The first ``num_tasks`` tasks."""
        return Split(self.images[:num_tasks], self.labels[:num_tasks])


@dataclasses.dataclass(frozen=True)
class SuiteData:
    """The splits of a task suite.

    Attributes:
      tasks: the tasks, in benchmark order.
      train: clean training images (noise is added per step).
      val: noisy validation images (alpha / beta selection).
      test: noisy test images (reported numbers).
      noise: (T,) pixel-noise standard deviation per task.
      num_classes: (T,) classes per task.
    """

    tasks: tuple[Task, ...]
    train: Split
    val: Split
    test: Split
    noise: np.ndarray
    num_classes: np.ndarray


def generate_split(tasks: Sequence[Task], split: str, n: int, *, seed: int, style: float = 0.0,
                   progress: bool = False) -> Split:
    """``n`` images of every task's ``split`` (clean for ``"train"``, noisy otherwise), deterministic in ``seed``,
    in each task's look of amplitude ``style`` (`generators.domain_style`; 0: one shared look)."""
    items = [generate(task, split, n, seed=seed, noisy=split != "train", style=style)
             for task in tqdm(tasks, desc=f"generating {split} split", disable=not progress, leave=False)]
    return Split(np.stack([x for x, _ in items]), np.stack([y for _, y in items]))


def build_suite(tasks: Sequence[Task], *, train: int, val: int, test: int, seed: int, style: float = 0.0,
                progress: bool = True) -> SuiteData:
    """Generates every split of every task (`generate_split`: deterministic in ``seed``, in each task's look)."""
    sizes = {"train": train, "val": val, "test": test}
    stacked = {split: generate_split(tasks, split, n, seed=seed, style=style, progress=progress)
               for split, n in sizes.items()}
    return SuiteData(
        tasks=tuple(tasks),
        noise=np.array([t.noise for t in tasks], np.float32),
        num_classes=np.array([t.num_classes for t in tasks], np.int32),
        **stacked,
    )


@dataclasses.dataclass(frozen=True)
class PretrainData:
    """The pretraining mixture: clean images, caption ids and per-image noise levels.

    Each task has its own captions: one per class, or one per coarse label (see `tasks.coarse_labels`).
    """

    images: np.ndarray
    captions: np.ndarray
    noise: np.ndarray
    num_captions: int


PRETRAIN_LABELS = ("fine", "coarse")


def build_pretraining_mixture(
    tasks: Sequence[Task], *, per_task: int, seed: int, labels: str = "coarse", style: float = 0.0,
    progress: bool = True,
) -> PretrainData:
    """Images from every task's ``pretrain`` stream with one caption per class (``labels="fine"``) or per
    pair of neighbouring classes (``"coarse"``, `tasks.coarse_labels`), in each task's look (``style``, as
    `build_suite`)."""
    if labels not in PRETRAIN_LABELS:
        raise ValueError(f"pretraining labels must be one of {PRETRAIN_LABELS}, got {labels!r}.")
    images, captions, noise = [], [], []
    offset = 0
    for task in tqdm(tasks, desc="generating pretraining mixture", disable=not progress, leave=False):
        x, y = generate(task, "pretrain", per_task, seed=seed, noisy=False, style=style)
        images.append(x)
        captions.append(offset + (y if labels == "fine" else coarse_labels(task, y)))
        noise.append(np.full((per_task,), task.noise, np.float32))
        offset += task.num_classes if labels == "fine" else num_coarse_labels(task)
    return PretrainData(np.concatenate(images), np.concatenate(captions).astype(np.int32), np.concatenate(noise), offset)


def few_shot_examples(task_index: int, data: SuiteData, shots: int) -> np.ndarray:
    """``(MAX_CLASSES, shots, H, W, 3)`` clean training images, ``shots`` per class (zeros for absent classes).

    The first ``shots`` training examples of each class: what a zero-shot head
    is built from (see `subboost.bench.suites.vision.centroid_heads`).
    """
    labels = data.train.labels[task_index]
    out = np.zeros((MAX_CLASSES, shots) + data.train.images.shape[2:], np.float32)
    for c in range(int(data.num_classes[task_index])):
        where = np.flatnonzero(labels == c)[:shots]
        if where.size < shots:
            raise ValueError(f"task {data.tasks[task_index].name!r}: only {where.size} training examples of class {c}, need {shots}.")
        out[c] = data.train.images[task_index, where]
    return out
