"""Accuracy of image encoders with one frozen linear head per task, batched and jit-compiled.

Per task: ``acc_t = (1/N_t) sum_i [argmax_c logits_t(x_i)_c == y_i]``.

One compiled encoder call per batch shape (shared by all tasks and all sweep
points), one small compiled head per class count, counts of correct
predictions accumulated on the device and read back once per evaluation. The
last batch is padded to the batch size and masked, so no shape changes cause
recompilation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.data.preprocessing import CLIP_MEAN, CLIP_STD, normalize_images
from subboost.errors import SubboostError
from subboost.models.heads import ClassificationHead
from subboost.tree import PyTree

__all__ = ["DeviceSplit", "EncodeFn", "Evaluator", "head_num_classes"]

EncodeFn = Callable[[PyTree, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split held on the device as fixed-size batches (the last one padded and masked)."""

    images: tuple[jax.Array, ...]
    labels: tuple[jax.Array, ...]
    mask: tuple[jax.Array, ...]
    num_examples: int


def head_num_classes(head: Mapping[str, Any], *, task: str = "head") -> int:
    """Class count of `ClassificationHead` parameters ``{"kernel": (D, C), "bias": (C,)}``."""
    if not isinstance(head, Mapping) or "kernel" not in head or "bias" not in head:
        keys = sorted(head) if isinstance(head, Mapping) else type(head).__name__
        raise SubboostError(f"head of task {task!r} must be ClassificationHead parameters "
                            f"{{'kernel': (embed_dim, num_classes), 'bias': (num_classes,)}}; got {keys}.")
    kernel_shape, bias_shape = tuple(np.shape(head["kernel"])), tuple(np.shape(head["bias"]))
    if len(kernel_shape) != 2 or bias_shape != kernel_shape[1:]:
        raise SubboostError(f"head of task {task!r}: kernel {kernel_shape} and bias {bias_shape} do not form "
                            "a (embed_dim, num_classes) / (num_classes,) head.")
    return kernel_shape[1]


def _count_correct(head: PyTree, features: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    logits = ClassificationHead(head["kernel"].shape[1]).apply({"params": head}, features)
    hits = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(hits, dtype=jnp.int32)


_jitted_correct = jax.jit(_count_correct)


@functools.lru_cache(maxsize=None)
def _jitted_features(encode: EncodeFn, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    # Cached per encoder, so evaluators of one model share compiled programs.
    return jax.jit(lambda params, images: encode(params, normalize_images(images, mean, std)))


@functools.lru_cache(maxsize=None)
def _clip_encoder(config: Any) -> EncodeFn:
    from subboost.models.clip_vit import CLIPVisionTransformer

    model = CLIPVisionTransformer(config)
    return lambda params, images: model.apply({"params": params}, images)


class Evaluator:
    """Accuracy of an image encoder with one linear head per task.

    Args:
      encode: ``encode(params, images) -> features (B, D)`` for normalised images.
      heads: ``{task: {"kernel": (D, C), "bias": (C,)}}``.
      num_classes: ``{task: C}`` from the datasets; a head whose class count
        differs raises (the head and the dataset do not belong together).
      batch_size: examples per compiled call.
      mean, std: normalisation applied on the device to uint8 images (CLIP's by
        default); float images are taken as already normalised.

    Example:
      >>> ev = Evaluator.for_clip(get_config("tiny"), heads)          # doctest: +SKIP
      >>> ev.accuracies(params, {"MNIST": (images, labels)})          # doctest: +SKIP
      {'MNIST': 0.91}
    """

    def __init__(
        self,
        encode: EncodeFn,
        heads: Mapping[str, Mapping[str, Any]],
        *,
        num_classes: Mapping[str, int] | None = None,
        batch_size: int = 256,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SubboostError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.num_classes = {task: head_num_classes(h, task=task) for task, h in heads.items()}
        self.heads = {task: {"kernel": jnp.asarray(h["kernel"]), "bias": jnp.asarray(h["bias"])}
                      for task, h in heads.items()}
        for task, expected in (num_classes or {}).items():
            if task in self.num_classes and self.num_classes[task] != expected:
                raise SubboostError(
                    f"head of task {task!r} has {self.num_classes[task]} classes (kernel shape "
                    f"{tuple(self.heads[task]['kernel'].shape)}), but the dataset has {expected} classes."
                )
        self._features = _jitted_features(encode, tuple(map(float, mean)), tuple(map(float, std)))
        self._correct = _jitted_correct

    @classmethod
    def for_clip(cls, config: Any, heads: Mapping[str, Mapping[str, Any]], **kwargs: Any) -> "Evaluator":
        """An evaluator for `subboost.models.CLIPVisionTransformer` parameters."""
        return cls(_clip_encoder(config), heads, **kwargs)

    def _head(self, task: str) -> PyTree:
        if task not in self.heads:
            raise SubboostError(f"no head for task {task!r}; heads exist for {sorted(self.heads)}.")
        return self.heads[task]

    def _check_labels(self, task: str, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise SubboostError(f"task {task!r}: labels must be 1-D, got shape {labels.shape}.")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes[task]):
            raise SubboostError(f"task {task!r}: labels span {int(labels.min())}..{int(labels.max())}, but the head "
                                f"has {self.num_classes[task]} classes (0..{self.num_classes[task] - 1}).")

    def _pad(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(labels)
        pad = (-n) % self.batch_size
        mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        return images, labels.astype(np.int32), mask

    def prepare(self, task: str, images: Any, labels: Any) -> DeviceSplit:
        """Moves a split to the device once, as padded fixed-size batches (reused by every sweep point)."""
        self._head(task)
        images, labels = np.asarray(images), np.asarray(labels)
        if len(images) != len(labels):
            raise SubboostError(f"task {task!r}: {len(images)} images but {len(labels)} labels.")
        if len(labels) == 0:
            raise SubboostError(f"task {task!r}: the split has no examples.")
        self._check_labels(task, labels)
        n = len(labels)
        images, labels, mask = self._pad(images, labels)
        b = self.batch_size
        chunks = range(0, len(labels), b)
        return DeviceSplit(
            images=tuple(jax.device_put(images[i : i + b]) for i in chunks),
            labels=tuple(jax.device_put(labels[i : i + b]) for i in chunks),
            mask=tuple(jax.device_put(mask[i : i + b]) for i in chunks),
            num_examples=n,
        )

    def _correct_count(self, params: PyTree, task: str, data: Any) -> tuple[jax.Array, int]:
        head = self._head(task)
        correct = jnp.zeros((), jnp.int32)
        if isinstance(data, DeviceSplit):
            for images, labels, mask in zip(data.images, data.labels, data.mask):
                correct = correct + self._correct(head, self._features(params, images), labels, mask)
            return correct, data.num_examples
        if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
            return self._correct_count(params, task, self.prepare(task, *data))
        total = 0
        for images, labels in data:  # a stream of host batches (e.g. `subboost.data.numpy_batches`)
            images, labels = np.asarray(images), np.asarray(labels)
            self._check_labels(task, labels)
            for start in range(0, len(labels), self.batch_size):
                chunk_images, chunk_labels, mask = self._pad(images[start : start + self.batch_size],
                                                             labels[start : start + self.batch_size])
                features = self._features(params, chunk_images)
                correct = correct + self._correct(head, features, chunk_labels, mask)
            total += len(labels)
        if total == 0:
            raise SubboostError(f"task {task!r}: the split has no examples.")
        return correct, total

    def accuracies(self, params: PyTree, splits: Mapping[str, Any]) -> dict[str, float]:
        """``{task: accuracy}`` of ``params`` on each task's split.

        A split is a `DeviceSplit` (from `prepare`), an ``(images, labels)``
        pair of arrays, or an iterable of ``(images, labels)`` batches. Counts
        stay on the device until one transfer at the end.
        """
        counts = {task: self._correct_count(params, task, data) for task, data in splits.items()}
        correct = jax.device_get({task: c for task, (c, _) in counts.items()})
        return {task: int(correct[task]) / n for task, (_, n) in counts.items()}

    def accuracy(self, params: PyTree, task: str, data: Any) -> float:
        """Accuracy on one task (see `accuracies`)."""
        return self.accuracies(params, {task: data})[task]
