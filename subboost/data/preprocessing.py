"""CLIP image preprocessing: resize, center crop, normalise.

CLIP's evaluation transform (OpenAI and open_clip) is::

    Resize(size, bicubic)     shorter side -> size, longer side int(size * long / short)
    CenterCrop(size)          offsets round((h - size) / 2), round((w - size) / 2)
    RGB, to [0, 1]            grayscale images repeat their channel
    x' = (x - mean) / std     mean, std = `CLIP_MEAN`, `CLIP_STD`

PIL's bicubic resize filters with an antialiasing kernel when it shrinks and
returns uint8, so the TensorFlow version resizes with ``antialias=True`` and
rounds and clips to uint8 (measured: within one grey level of PIL). The
pipelines stop at the uint8 crop; normalisation is a cheap affine map that
`normalize_images` applies on the accelerator (4x less data to move).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size`` (torchvision's rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centered ``size x size`` crop (torchvision's rule)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_and_center_crop(image: Any, size: int = DEFAULT_IMAGE_SIZE, *, transpose: bool = False) -> Any:
    """One decoded image ``(H, W, C)`` uint8 -> ``(size, size, 3)`` uint8 (TensorFlow ops).

    Grayscale images get three identical channels; RGBA images lose alpha.
    ``transpose`` swaps height and width first (EMNIST's storage order).
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    if transpose:
        image = tf.transpose(image, (1, 0, 2))
    channels = tf.shape(image)[-1]
    image = tf.cond(channels == 1, lambda: tf.tile(image, (1, 1, 3)), lambda: image[..., :3])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.minimum(height, width)
    # int(size * long / short) with exact integer arithmetic (floor of a positive ratio).
    new_height = tf.where(height <= width, size, (size * height) // short)
    new_width = tf.where(height <= width, (size * width) // short, size)
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_height, new_width]),
                              method="bicubic", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    # Python's round() is half-to-even: round((h - size) / 2) for odd h - size
    # (an x.5 value) goes to the even neighbour, as torchvision's CenterCrop does.
    top = _round_half_even_half(new_height - size)
    left = _round_half_even_half(new_width - size)
    cropped = resized[top : top + size, left : left + size]
    return tf.ensure_shape(cropped, (size, size, 3))


def _round_half_even_half(excess: Any) -> Any:
    """``round(excess / 2)`` with Python's half-to-even rule, for integer tensors."""
    import tensorflow as tf

    half = excess // 2
    odd = tf.math.floormod(excess, 2) == 1
    # excess = 2 * half + 1: excess / 2 = half + 0.5 rounds to the even one of half, half + 1.
    return tf.where(odd & (tf.math.floormod(half, 2) == 1), half + 1, half)


def normalize_images(
    images: Any,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jnp.ndarray:
    """uint8 images ``(..., H, W, 3)`` -> float32 ``(x / 255 - mean) / std`` (jax).

    Float input is taken as already normalised and returned as float32
    unchanged, so pipelines that normalise themselves compose with it.
    """
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(jnp.float32)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def normalize_images_tf(images: Any, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Any:
    """`normalize_images` in TensorFlow, for pipelines that hand out float images."""
    import tensorflow as tf

    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def normalize_images_np(images: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                        std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """`normalize_images` in numpy (host side)."""
    return ((np.asarray(images, np.float32) / 255.0 - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))
