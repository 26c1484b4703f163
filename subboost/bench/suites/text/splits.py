"""The tokenised task suite: every task's splits as stacked ``(T, n, L)`` arrays.

All splits are padded to one length ``L`` (the longest tokenised sentence of the suite,
at most ``max_length``), so every jit-compiled function sees one shape per split.
The ``heads`` split holds ``head_shots`` sentences per class, ordered by class, for the
frozen prototype heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from subboost.bench.suites.text.generators import TextTask, generate
from subboost.bench.suites.text.tokenize import SentenceTokenizer


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of every task: ``input_ids``, ``attention_mask`` ``(T, n, L)``, ``labels`` ``(T, n)``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    sentences: tuple[tuple[str, ...], ...]

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[0]

    def take(self, num_tasks: int) -> Split:
        """The first ``num_tasks`` tasks."""
        return Split(self.input_ids[:num_tasks], self.attention_mask[:num_tasks], self.labels[:num_tasks],
                     self.sentences[:num_tasks])


@dataclasses.dataclass(frozen=True)
class TextSuite:
    tasks: tuple[TextTask, ...]
    train: Split
    val: Split
    test: Split
    heads: Split  # head_shots sentences per class, class-major; rows past a task's classes repeat class 0
    num_classes: np.ndarray
    length: int
    truncated: int


def build_suite(
    tasks: Sequence[TextTask],
    tokenizer: SentenceTokenizer,
    *,
    train: int,
    val: int,
    test: int,
    head_shots: int,
    max_length: int,
    seed: int,
) -> TextSuite:
    """Generates and tokenises every split of ``tasks`` (deterministic in ``seed``)."""
    max_classes = max(t.num_classes for t in tasks)
    raw: dict[str, list[tuple[list[str], np.ndarray]]] = {"train": [], "val": [], "test": [], "heads": []}
    for task in tasks:
        for split, n in (("train", train), ("val", val), ("test", test)):
            raw[split].append(generate(task, n, seed=seed, split=split))
        sentences, labels = generate(task, head_shots * task.num_classes, seed=seed, split="heads")
        order = np.argsort(labels, kind="stable")  # class-major: (C, k)
        sentences = [sentences[i] for i in order]
        sentences += sentences[:head_shots] * (max_classes - task.num_classes)  # padding rows, never used
        raw["heads"].append((sentences, np.repeat(np.arange(max_classes), head_shots).astype(np.int32)))
    return tokenise_suite(tasks, raw, tokenizer, max_length=max_length)


def tokenise_suite(tasks: Sequence[TextTask], raw: dict[str, list[tuple[list[str], np.ndarray]]],
                   tokenizer: SentenceTokenizer, *, max_length: int) -> TextSuite:
    """The `TextSuite` of ``raw[split][task] = (sentences, labels)`` for the splits train, val, test and heads
    (heads class-major, the same rows for every task), all padded to the suite's longest tokenised sentence."""
    every = [s for split in raw.values() for sentences, _ in split for s in sentences]
    probe = tokenizer.encode(every, max_length=max_length)
    length, truncated = probe.input_ids.shape[1], probe.truncated

    def tokenised(split: str) -> Split:
        ids, masks, labels, texts = [], [], [], []
        for sentences, y in raw[split]:
            enc = tokenizer.encode(sentences, max_length=max_length, pad_to=length)
            ids.append(enc.input_ids)
            masks.append(enc.attention_mask)
            labels.append(y)
            texts.append(tuple(sentences))
        return Split(np.stack(ids), np.stack(masks), np.stack(labels), tuple(texts))

    return TextSuite(
        tasks=tuple(tasks), train=tokenised("train"), val=tokenised("val"), test=tokenised("test"),
        heads=tokenised("heads"), num_classes=np.array([t.num_classes for t in tasks], np.int32),
        length=length, truncated=truncated,
    )
