"""tf.data pipelines for the benchmark tasks: decode, CLIP-crop, batch, hand to numpy.

Every split comes out as ``(image, label)`` with ``image`` a uint8
``(size, size, 3)`` CLIP crop (see `subboost.data.preprocessing`) and ``label``
int32, in a fixed order. Nothing is ever downloaded: tfds datasets must be
prepared in ``data_dir`` beforehand and local tasks must be unpacked there; a
missing dataset raises `FileNotFoundError` saying what to put where.

Local tasks (GTSRB, FER2013, RenderedSST2) use the ImageFolder layout::

    <data_dir>/<local_dir>/<split dir>/<class dir>/<image file>

with class directories named by integer label (``0``, ``00042``) or by the
task's class names (e.g. FER2013's ``angry`` ... ``neutral``), which fixes the
label order independently of alphabetical order.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from subboost.data.preprocessing import DEFAULT_IMAGE_SIZE, normalize_images_tf, resize_and_center_crop
from subboost.data.tasks import Task, get_task, split_spec
from subboost.errors import SubboostError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pnm")
# Fixed seed of the permutation applied to local file lists before slicing.
LOCAL_ORDER_SEED = 0


def default_data_dir() -> str:
    """Where tfds looks when no data_dir is given: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


# ----------------------------------------------------------------------------
# Local (ImageFolder) tasks
# ----------------------------------------------------------------------------
def local_layout_help(task: Task, data_dir: str) -> str:
    """Where a local task's files go, as a sentence for error messages."""
    root = Path(data_dir) / task.local_dir
    split_dirs = sorted({spec.split("[")[0] for spec in task.splits.values()})
    names = f" or the class names {', '.join(task.class_dirs)} (in label order)" if task.class_dirs else ""
    return (
        f"Put {task.name} under {root} as {root}/<split>/<class>/<image> with split directories "
        f"{', '.join(split_dirs)} and one directory per class named by its integer label "
        f"0..{task.num_classes - 1}{names}; images as {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}."
    )


def _class_label(task: Task, name: str, split_dir: Path) -> int:
    if name.isdigit():
        label = int(name)
    elif name.lower() in task.class_dirs:
        label = task.class_dirs.index(name.lower())
    else:
        accepted = f"integer labels or one of {list(task.class_dirs)}" if task.class_dirs else "integer labels"
        raise SubboostError(f"{task.name}: unexpected class directory {str(split_dir / name)!r}; "
                            f"class directories must be named by {accepted}.")
    if not 0 <= label < task.num_classes:
        raise SubboostError(f"{task.name}: class directory {str(split_dir / name)!r} gives label {label}, "
                            f"outside 0..{task.num_classes - 1}.")
    return label


def local_files(task: str | Task, split_dir_name: str, *, data_dir: str) -> tuple[list[str], np.ndarray]:
    """All image files of one split directory of a local task and their labels.

    The list is sorted by path, then permuted with a fixed seed so that slices
    (``train[90%:]``) are class-balanced random subsets, identical on every run.
    """
    task = get_task(task)
    split_dir = Path(data_dir) / task.local_dir / split_dir_name
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{task.name}: no directory {str(split_dir)!r} (data_dir {str(data_dir)!r}). "
            + local_layout_help(task, data_dir)
        )
    paths, labels = [], []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        label = _class_label(task, class_dir.name, split_dir)
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(path))
                labels.append(label)
    if not paths:
        raise FileNotFoundError(f"{task.name}: found no images in {str(split_dir)!r}. "
                                + local_layout_help(task, data_dir))
    order = np.random.default_rng(LOCAL_ORDER_SEED).permutation(len(paths))
    return [paths[i] for i in order], np.asarray(labels, np.int32)[order]


def slice_bounds(spec: str, num_examples: int) -> tuple[str, int, int]:
    """``"train[90%:]"``, 50 -> ``("train", 45, 50)``: tfds' slicing rules on a local list."""
    import tensorflow_datasets as tfds

    instruction = tfds.core.ReadInstruction.from_spec(spec)
    name = spec.split("[")[0]
    (absolute,) = instruction.to_absolute({name: types.SimpleNamespace(num_examples=num_examples)})
    start = absolute.from_ or 0
    stop = num_examples if absolute.to is None else absolute.to
    return name, start, stop


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*([^\s#]+)")


def _decode_ppm(data: bytes) -> np.ndarray:
    """Binary PPM (P6) / PGM (P5) with maxval < 256 -> uint8 (H, W, C); GTSRB ships these."""
    data = data.item() if isinstance(data, np.ndarray) else bytes(data)
    fields, position = [], 0
    for _ in range(4):  # magic, width, height, maxval; comments allowed in between
        match = _PNM_TOKEN.match(data, position)
        if match is None:
            raise SubboostError("truncated PNM header.")
        fields.append(match.group(1))
        position = match.end()
    try:
        magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    except ValueError as err:
        raise SubboostError(f"bad PNM header {fields!r}.") from err
    if magic not in (b"P5", b"P6") or maxval > 255:
        raise SubboostError(f"unsupported PNM image (magic {magic!r}, maxval {maxval}); use 8-bit binary P5/P6.")
    channels = 3 if magic == b"P6" else 1
    size = width * height * channels
    if len(data) < position + 1 + size:
        raise SubboostError(f"truncated PNM image: {width}x{height}x{channels} needs {size} bytes of pixels.")
    pixels = np.frombuffer(data, np.uint8, size, position + 1)  # one whitespace byte ends the header
    return pixels.reshape(height, width, channels)


def _decode_file(path: Any) -> Any:
    import tensorflow as tf

    data = tf.io.read_file(path)
    is_pnm = tf.strings.regex_full_match(tf.strings.lower(path), r".*\.p[gpn]m")

    def pnm():
        image = tf.numpy_function(_decode_ppm, [data], tf.uint8)
        return tf.ensure_shape(image, (None, None, None))

    def other():
        return tf.io.decode_image(data, channels=0, expand_animations=False)

    return tf.cond(is_pnm, pnm, other)


def _local_dataset(task: Task, spec: str, data_dir: str) -> Any:
    import tensorflow as tf

    name, start, stop = slice_bounds(spec, 10**9)  # validate the spec before touching files
    paths, labels = local_files(task, name, data_dir=data_dir)
    _, start, stop = slice_bounds(spec, len(paths))
    ds = tf.data.Dataset.from_tensor_slices((paths[start:stop], labels[start:stop]))
    return ds.map(lambda path, label: (_decode_file(path), label), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


# ----------------------------------------------------------------------------
# tensorflow-datasets tasks
# ----------------------------------------------------------------------------
def _tfds_dataset(task: Task, spec: str, data_dir: str | None) -> Any:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder(task.tfds_name, data_dir=data_dir, try_gcs=False)
    num_classes = builder.info.features["label"].num_classes
    if num_classes != task.num_classes:
        raise SubboostError(f"{task.name}: tfds builder {task.tfds_name!r} has {num_classes} classes, "
                            f"the task registry says {task.num_classes}.")
    try:
        ds = builder.as_dataset(split=spec, shuffle_files=False,
                                read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False))
    except AssertionError as err:  # tfds signals a dataset that is not prepared this way
        where = data_dir or default_data_dir()
        raise FileNotFoundError(
            f"{task.name}: tensorflow-datasets builder {task.tfds_name!r} is not prepared in data_dir "
            f"{where!r} (looked for {builder.data_dir!r}). Nothing is downloaded during evaluation: "
            f"prepare it once on a machine with internet access with `tfds build {task.tfds_name} "
            f"--data_dir {where}` (builders that need a manual download, such as resisc45, also take "
            "--manual_dir) and pass the same data_dir."
        ) from err
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


# ----------------------------------------------------------------------------
# Public pipelines
# ----------------------------------------------------------------------------
def split_dataset(
    task: str | Task,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    normalize: bool = False,
    max_examples: int | None = None,
    batch_size: int | None = None,
) -> Any:
    """A `tf.data.Dataset` of ``(image, label)`` for one split of one task.

    Args:
      task: a task name (see `subboost.data.TASKS`) or `Task`.
      split: ``"train"``, ``"validation"`` or ``"test"`` (see `Task.splits`).
      data_dir: tfds data directory; local tasks live in subdirectories of it.
        ``None``: tfds' default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      image_size: side of the square CLIP crop (224 for the paper's models).
      normalize: hand out float32 ``(x / 255 - mean) / std`` instead of uint8.
      max_examples: keep the first ``max_examples`` examples of the split.
      batch_size: batch the examples (the last batch may be smaller).

    Returns:
      ``(image, label)`` with image ``(size, size, 3)`` uint8 (or float32 when
      ``normalize``) and label int32, in a fixed order.
    """
    import tensorflow as tf

    task = get_task(task)
    spec = split_spec(task, split)
    if not isinstance(image_size, int) or image_size < 1:
        raise SubboostError(f"image_size must be a positive integer, got {image_size!r}.")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise SubboostError(f"max_examples must be a positive integer or None, got {max_examples!r}.")
    if task.is_local:
        ds = _local_dataset(task, spec, data_dir or default_data_dir())
    else:
        ds = _tfds_dataset(task, spec, data_dir)
    if max_examples is not None:
        ds = ds.take(max_examples)

    def preprocess(image, label):
        image = resize_and_center_crop(image, image_size, transpose=task.transpose)
        return (normalize_images_tf(image) if normalize else image), label

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if batch_size is not None:
        ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def numpy_batches(task: str | Task, split: str, *, batch_size: int, **kwargs: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(images, labels)`` as numpy arrays; keyword arguments as `split_dataset`."""
    return iter(split_dataset(task, split, batch_size=batch_size, **kwargs).as_numpy_iterator())


def split_arrays(task: str | Task, split: str, *, batch_size: int = 256, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory: ``images (N, size, size, 3)``, ``labels (N,)`` int32.

    Keyword arguments as `split_dataset`; use ``max_examples`` to bound memory
    (a 224 crop is 150 KB as uint8).
    """
    images, labels = [], []
    for batch_images, batch_labels in numpy_batches(task, split, batch_size=batch_size, **kwargs):
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        raise SubboostError(f"{get_task(task).name}: split {split!r} ({split_spec(task, split)}) has no examples.")
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)
