"""Symmetric label noise for fine-tuning: each training label is replaced, with probability ``rate``,
by one of the task's *other* classes drawn uniformly.

For task ``t`` with ``C_t`` classes, example ``i`` keeps ``y_i`` with probability
``1 - rate`` and otherwise becomes ``(y_i + u_i) mod C_t`` with ``u_i`` uniform in
``{1, ..., C_t - 1}``; so a fraction ``rate`` of the labels is wrong in expectation
and the wrong labels carry no information about the class. The draw depends only on
``(seed, task index)``: the same seed corrupts the same examples at every run.
Only fine-tuning sees the corrupted labels; the frozen heads and every evaluation split stay
clean. Shared by every suite: `with_label_noise` takes any suite data with a ``train`` split
(a dataclass with ``labels``) and ``num_classes``.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np

Data = TypeVar("Data")
_STREAM = 0x1AB31  # separates this stream from the generators' (which hash task names)


def corrupt_labels(labels: np.ndarray, num_classes: np.ndarray, *, rate: float, seed: int) -> np.ndarray:
    """``labels`` (T, n) with a fraction ``rate`` (in expectation) replaced by another class of the same task."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"BenchConfig.finetune_label_noise must lie in [0, 1), got {rate}.")
    labels = np.asarray(labels)
    out = labels.copy()
    if rate == 0.0:
        return out
    for t, classes in enumerate(np.asarray(num_classes)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM, t]))
        flip = rng.random(labels.shape[1]) < rate
        shift = rng.integers(1, int(classes), labels.shape[1])
        out[t] = np.where(flip, (labels[t] + shift) % int(classes), labels[t])
    return out.astype(labels.dtype)


def with_label_noise(data: Data, *, rate: float, seed: int) -> Data:
    """``data`` with its training labels corrupted (`corrupt_labels`, deterministic in ``seed``); heads,
    validation and test unchanged. Rate 0 returns ``data`` itself."""
    if rate == 0.0:
        return data
    labels = corrupt_labels(data.train.labels, data.num_classes, rate=rate, seed=seed)
    return dataclasses.replace(data, train=dataclasses.replace(data.train, labels=labels))
