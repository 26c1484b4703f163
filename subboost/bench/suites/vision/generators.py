"""Twenty offline image-classification tasks sharing one input space.

Every task draws ``16 x 16`` RGB images (values in ``[0, 1]``) and integer labels
from a seeded `numpy.random.Generator`; nothing is downloaded. The tasks differ
in what they need from an encoder, as the real 20-task suite does (objects,
colour, texture, geometry, counting, characters, real handwriting):

======================  =======  ===========================================================
task                    classes  what decides the label (everything else is random nuisance)
======================  =======  ===========================================================
shapes                  6        circle / square / triangle / cross / ring / bar, any rotation
stripes                 8        grating orientation in steps of 22.5 degrees
sklearn_digits          10       scikit-learn's bundled 8x8 handwritten digits, upscaled
textures                6        checkerboard / dot lattice / grid / speckle / rings / blocks
count                   5        number of dots (1..5)
font_digits             10       digits 0-9 from a 5x7 bitmap font, affine-jittered
colours                 8        hue of one blob (8 hue bins) on a grey background
position                9        3x3 grid cell that holds a small object
letters_a_j             10       letters A-J, 5x7 bitmap font, affine-jittered
size                    5        radius class of one filled shape
sklearn_digits_colour   10       handwritten digits, random foreground/background colours
relative_position       4        circle left of / right of / above / below a square
gradient                8        direction of a brightness ramp (8 compass directions)
fill_style              4        shape filled / outlined / striped / dotted
sklearn_digits_rotation 4        rotation of a handwritten digit by 0 / 90 / 180 / 270 deg
symmetry                4        mirror symmetry: left-right / top-bottom / both / none
letters_k_t             10       letters K-T, small and anywhere in the image
odd_one_out             4        quadrant of the blob whose hue differs from the other three
frequency               5        spatial frequency of a grating (1.5 .. 5.5 cycles per image)
sklearn_digits_small    10       smaller handwritten digit anywhere, over clutter blocks
======================  =======  ===========================================================

The order is the benchmark order: the 8-, 14- and 20-task settings take the
first 8, 14 and 20 tasks (as the real suites grow 8 -> 14 -> 20), and every
family (shapes, textures, characters, handwriting) appears in the first 8.

Images are generated *clean*; each task has a pixel-noise level ``noise``
(Gaussian, standard deviation in ``[0, 1]`` pixel units, clipped to ``[0, 1]``)
that training adds afresh at every step and evaluation splits add once, from
the split's seed. Labels are balanced within a split (``i % classes``,
shuffled). The handwritten-digit tasks draw from disjoint pools of
scikit-learn's 1797 digits (train 1047 / val 250 / test 500, a fixed partition
that does not depend on the run seed, like an official dataset split); the
procedural tasks draw fresh images for every split.

Each task can also have its own *look* (`domain_style`, amplitude ``style`` in
`generate`; the default benchmark uses 0.3, tiny none): a fixed colour mixing
and background pattern per task, so that the tasks' inputs differ as different
datasets' do and an expert's change for its own images need not act on the
others' (see the README's "Why each task has its own look").

Pretraining (see `subboost.bench.suites.vision.pretrain`) sees other images from the same
generators, labelled only *coarsely*: `coarse_labels` merges each task's
classes into pairs of neighbours (0-1, 2-3, ...: "1 or 2 dots", "digit 4 or 5",
"orientation 0 or 22.5 deg"), so the pretrained encoder knows every domain but
confuses each class with its neighbour, the way CLIP knows many concepts
loosely. The experts have to learn the distinctions inside the pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

IMAGE_SIZE = 16
CHANNELS = 3
# Model input = (image - PIXEL_MEAN) / PIXEL_STD.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25
SPLITS = ("train", "val", "test", "pretrain")

# Pixel centres, (H, W).
_YY, _XX = np.meshgrid(np.arange(IMAGE_SIZE) + 0.5, np.arange(IMAGE_SIZE) + 0.5, indexing="ij")

Generator = Callable[[np.random.Generator, np.ndarray, str], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Task:
    """One generated classification task.

    Attributes:
      name: short identifier.
      class_names: one name per class (``len`` = number of classes).
      noise: standard deviation of the Gaussian pixel noise added to images.
      render: ``(rng, labels, split) -> clean images (n, 16, 16, 3) float32 in [0, 1]``.
      description: what decides the label.
    """

    name: str
    class_names: tuple[str, ...]
    noise: float
    render: Generator
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------
# Drawing primitives (vectorised over a batch of n images)
# ----------------------------------------------------------------------------
def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in ``[0, 1]`` (any matching shapes) -> RGB with a trailing axis of 3."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )
    return np.take_along_axis(table, i[None, ..., None], axis=0)[0]


def random_colours(
    rng: np.random.Generator,
    n: int,
    *,
    hue: np.ndarray | None = None,
    saturation: tuple[float, float] = (0.6, 1.0),
    value: tuple[float, float] = (0.65, 1.0),
) -> np.ndarray:
    """``(n, 3)`` colours; uniform random hue unless given."""
    h = rng.random(n) if hue is None else hue
    return hsv_to_rgb(h, rng.uniform(*saturation, n), rng.uniform(*value, n))


def dark_backgrounds(rng: np.random.Generator, n: int, *, max_value: float = 0.35) -> np.ndarray:
    """``(n, H, W, 3)`` canvases of one dark random colour each."""
    colour = random_colours(rng, n, saturation=(0.0, 0.8), value=(0.0, max_value))
    return np.broadcast_to(colour[:, None, None, :], (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def paint(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blends ``colour`` (n, 3) into ``canvas`` (n, H, W, 3) where ``coverage`` (n, H, W) > 0."""
    c = coverage[..., None]
    return canvas * (1.0 - c) + c * colour[:, None, None, :]


def coverage_from_sdf(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased pixel coverage of a signed distance field (negative inside)."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _column(x: np.ndarray | float, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(x, np.float64), (n,))[:, None, None]


SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "bar")


def shape_sdf(kind: np.ndarray, centre: np.ndarray, radius: np.ndarray, angle: np.ndarray | float = 0.0) -> np.ndarray:
    """Signed distance (pixels) to shapes of `SHAPE_NAMES` index ``kind`` (n,), at ``centre`` (n, 2) = (y, x).

    ``radius`` is the circumradius-like size; ``angle`` rotates the shape.
    """
    n = kind.shape[0]
    dy = _YY[None] - centre[:, 0, None, None]
    dx = _XX[None] - centre[:, 1, None, None]
    a = _column(angle, n)
    c, s = np.cos(a), np.sin(a)
    x, y = c * dx + s * dy, -s * dx + c * dy
    r = _column(radius, n)
    dist = np.sqrt(x * x + y * y)
    thick = np.maximum(0.3 * r, 0.8)
    triangle = np.max(
        np.stack([np.cos(t) * x + np.sin(t) * y for t in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]),
        axis=0,
    ) - 0.5 * r
    sdfs = np.stack(
        [
            dist - r,
            np.maximum(np.abs(x), np.abs(y)) - 0.8 * r,
            triangle,
            np.minimum(np.maximum(np.abs(x) - r, np.abs(y) - thick), np.maximum(np.abs(x) - thick, np.abs(y) - r)),
            np.abs(dist - 0.75 * r) - 0.5 * thick,
            np.maximum(np.abs(x) - r, np.abs(y) - thick),
        ]
    )
    return np.take_along_axis(sdfs, kind[None, :, None, None], axis=0)[0]


def sample_bitmaps(
    bitmaps: np.ndarray,
    *,
    centre: np.ndarray,
    scale: np.ndarray,
    angle: np.ndarray | float = 0.0,
    shear: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Bilinear affine warp of ``bitmaps`` (n, h, w) in ``[0, 1]`` onto ``(n, H, W)``.

    The bitmap's centre lands at ``centre`` (n, 2) = (y, x); ``scale`` (n, 2) is
    (vertical, horizontal) output pixels per bitmap pixel; then shear (x += k y)
    and rotation by ``angle``. Outside the bitmap is 0.
    """
    n, h, w = bitmaps.shape
    dy = _YY[None] - centre[:, 0, None, None]
    dx = _XX[None] - centre[:, 1, None, None]
    a = _column(angle, n)
    c, s = np.cos(a), np.sin(a)
    rx, ry = c * dx + s * dy, -s * dx + c * dy
    rx = rx - _column(shear, n) * ry
    iy = ry / scale[:, 0, None, None] + h / 2 - 0.5
    ix = rx / scale[:, 1, None, None] + w / 2 - 0.5
    padded = np.pad(bitmaps, ((0, 0), (1, 1), (1, 1))).reshape(n, -1)
    y0, x0 = np.floor(iy), np.floor(ix)
    fy, fx = iy - y0, ix - x0
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE))
    rows = np.arange(n)[:, None]
    for oy, wy in ((0, 1 - fy), (1, fy)):
        for ox, wx in ((0, 1 - fx), (1, fx)):
            yi = np.clip(y0 + oy + 1, 0, h + 1).astype(int)
            xi = np.clip(x0 + ox + 1, 0, w + 1).astype(int)
            values = padded[rows, (yi * (w + 2) + xi).reshape(n, -1)].reshape(n, IMAGE_SIZE, IMAGE_SIZE)
            out += wy * wx * values
    return out


def grating(angle: np.ndarray, cycles_per_pixel: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` sinusoid in ``[0, 1]`` varying along direction ``angle``."""
    n = angle.shape[0]
    a = _column(angle, n)
    t = np.cos(a) * _XX[None] + np.sin(a) * _YY[None]
    return 0.5 + 0.5 * np.sin(2 * np.pi * _column(cycles_per_pixel, n) * t + _column(phase, n))


def two_colour_image(rng: np.random.Generator, pattern: np.ndarray, *, min_contrast: float = 0.35) -> np.ndarray:
    """Maps a ``(n, H, W)`` pattern in ``[0, 1]`` between two random colours of clear contrast."""
    n = pattern.shape[0]
    fg = random_colours(rng, n, saturation=(0.0, 1.0), value=(0.6, 1.0))
    bg = random_colours(rng, n, saturation=(0.0, 1.0), value=(0.0, 0.6 - min_contrast))
    swap = rng.random(n) < 0.5
    fg[swap], bg[swap] = bg[swap].copy(), fg[swap].copy()
    p = pattern[..., None]
    return bg[:, None, None, :] * (1 - p) + fg[:, None, None, :] * p


# ----------------------------------------------------------------------------
# Characters: a 5x7 bitmap font (drawn for this project) and sklearn's digits
# ----------------------------------------------------------------------------
_FONT_ROWS = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
}


def glyphs(characters: str) -> np.ndarray:
    """``(len(characters), 7, 5)`` float bitmaps of the built-in font."""
    return np.stack(
        [np.array([[c == "#" for c in row] for row in _FONT_ROWS[ch].split()], np.float64) for ch in characters]
    )


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark's handwritten-digit tasks need scikit-learn: pip install 'subboost[bench]'") from err
    digits = load_digits()
    return digits.images / 16.0, digits.target.astype(np.int64)


# Fixed partition of the 1797 digits (independent of the run seed, like an official split).
_DIGIT_POOL_SIZES = {"test": 500, "val": 250}


@functools.lru_cache(maxsize=None)
def digit_pool(split: str) -> np.ndarray:
    """Indices of scikit-learn digits available to ``split`` (pretrain shares train's pool)."""
    _, targets = _sklearn_digits()
    order = np.random.default_rng(20250621).permutation(len(targets))
    test_end = _DIGIT_POOL_SIZES["test"]
    val_end = test_end + _DIGIT_POOL_SIZES["val"]
    pools = {"test": order[:test_end], "val": order[test_end:val_end], "train": order[val_end:]}
    return np.sort(pools["train" if split == "pretrain" else split])


def draw_digits(rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    """``(n, 8, 8)`` handwritten digits with the given labels from ``split``'s pool."""
    images, targets = _sklearn_digits()
    pool = digit_pool(split)
    out = np.empty((labels.shape[0], 8, 8))
    for digit in np.unique(labels):
        candidates = pool[targets[pool] == digit]
        where = labels == digit
        out[where] = images[rng.choice(candidates, size=int(where.sum()))]
    return out


# ----------------------------------------------------------------------------
# The generators: (rng, labels, split) -> clean images
# ----------------------------------------------------------------------------
def _uniform_centres(rng: np.random.Generator, n: int, margin: np.ndarray | float) -> np.ndarray:
    margin = np.broadcast_to(np.asarray(margin, np.float64), (n,))
    return margin[:, None] + rng.random((n, 2)) * (IMAGE_SIZE - 2 * margin[:, None])


def _shapes(rng, labels, split):
    n = labels.shape[0]
    radius = rng.uniform(3.0, 6.0, n)
    centre = _uniform_centres(rng, n, radius * 0.8)
    cover = coverage_from_sdf(shape_sdf(labels, centre, radius, rng.uniform(0, 2 * np.pi, n)))
    return paint(dark_backgrounds(rng, n), cover, random_colours(rng, n))


def _stripes(rng, labels, split):
    n = labels.shape[0]
    angle = labels * np.pi / 8 + rng.uniform(-np.pi / 32, np.pi / 32, n)
    pattern = grating(angle, rng.uniform(0.12, 0.3, n), rng.uniform(0, 2 * np.pi, n))
    return two_colour_image(rng, pattern)


def _digit_canvas(rng, bitmaps, *, scale_range, centre_jitter, angle_deg, shear, colourful):
    n = bitmaps.shape[0]
    scale = rng.uniform(*scale_range, (n, 1)) * rng.uniform(0.9, 1.1, (n, 2))
    centre = IMAGE_SIZE / 2 + rng.uniform(-centre_jitter, centre_jitter, (n, 2))
    cover = sample_bitmaps(
        bitmaps,
        centre=centre,
        scale=scale,
        angle=np.deg2rad(rng.uniform(-angle_deg, angle_deg, n)),
        shear=rng.uniform(-shear, shear, n),
    )
    if colourful:
        return two_colour_image(rng, np.clip(cover, 0, 1))
    grey = np.clip(cover, 0, 1)[..., None] * rng.uniform(0.7, 1.0, (n, 1, 1, 1))
    return np.broadcast_to(grey, (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def _sklearn_digits_task(rng, labels, split):
    bitmaps = draw_digits(rng, labels, split)
    return _digit_canvas(rng, bitmaps, scale_range=(1.6, 2.0), centre_jitter=1.0, angle_deg=10, shear=0.1, colourful=False)


def _sklearn_digits_colour(rng, labels, split):
    bitmaps = draw_digits(rng, labels, split)
    return _digit_canvas(rng, bitmaps, scale_range=(1.6, 2.0), centre_jitter=1.0, angle_deg=10, shear=0.1, colourful=True)


_ROTATION_DIGITS = np.array([2, 3, 4, 5, 7])  # no digit equal to a rotation of itself or of another


def _sklearn_digits_rotation(rng, labels, split):
    n = labels.shape[0]
    bitmaps = draw_digits(rng, rng.choice(_ROTATION_DIGITS, n), split)
    bitmaps = np.stack([np.rot90(b, -k) for b, k in zip(bitmaps, labels)])
    return _digit_canvas(rng, bitmaps, scale_range=(1.6, 2.0), centre_jitter=1.0, angle_deg=10, shear=0.0, colourful=True)


def _sklearn_digits_small(rng, labels, split):
    n = labels.shape[0]
    bitmaps = draw_digits(rng, labels, split)
    scale = rng.uniform(1.3, 1.6, (n, 2))
    centre = _uniform_centres(rng, n, 6.0)
    cover = np.clip(sample_bitmaps(bitmaps, centre=centre, scale=scale), 0, 1)
    canvas = dark_backgrounds(rng, n)
    for _ in range(2):  # clutter: small grey squares anywhere (drawn under the digit)
        clutter = coverage_from_sdf(shape_sdf(np.ones(n, int), _uniform_centres(rng, n, 1.0), np.full(n, 1.2)))
        canvas = paint(canvas, clutter, random_colours(rng, n, saturation=(0.0, 0.2), value=(0.3, 0.7)))
    return paint(canvas, cover, random_colours(rng, n, value=(0.8, 1.0)))


_TEXTURE_NAMES = ("checkerboard", "dots", "grid", "speckle", "rings", "blocks")


def _textures(rng, labels, split):
    n = labels.shape[0]
    period = rng.integers(3, 6, n)[:, None, None].astype(np.float64)
    oy, ox = (rng.integers(0, 6, (2, n))[:, :, None, None]).astype(np.float64)
    y, x = _YY[None] - 0.5 + oy, _XX[None] - 0.5 + ox
    half = np.floor(period / 2)
    patterns = np.stack(
        [
            ((np.floor(y / half) + np.floor(x / half)) % 2).astype(np.float64),
            ((y % period < 1.5) & (x % period < 1.5)).astype(np.float64),
            ((y % period < 1) | (x % period < 1)).astype(np.float64),
            (rng.random((n, IMAGE_SIZE, IMAGE_SIZE)) < 0.5).astype(np.float64),
            (np.floor(np.hypot(y - 8 - oy / 2, x - 8 - ox / 2) / half) % 2).astype(np.float64),
            np.kron((rng.random((n, IMAGE_SIZE // 4, IMAGE_SIZE // 4)) < 0.5), np.ones((1, 4, 4))).astype(np.float64),
        ]
    )
    return two_colour_image(rng, np.take_along_axis(patterns, labels[None, :, None, None], axis=0)[0])


def _count(rng, labels, split):
    n = labels.shape[0]
    counts = labels + 1
    # Distinct cells of a 4x4 grid (4 px each), a 2x2 dot at a random offset in each.
    cells = np.argsort(rng.random((n, 16)), axis=1)
    canvas = dark_backgrounds(rng, n, max_value=0.3)
    colour = random_colours(rng, n)
    for i in range(5):
        present = (i < counts).astype(np.float64)
        cy = (cells[:, i] // 4) * 4 + rng.uniform(1.0, 3.0, n)
        cx = (cells[:, i] % 4) * 4 + rng.uniform(1.0, 3.0, n)
        dot = coverage_from_sdf(shape_sdf(np.zeros(n, int), np.stack([cy, cx], 1), np.full(n, 1.1)))
        canvas = paint(canvas, dot * present[:, None, None], colour)
    return canvas


def _colours(rng, labels, split):
    n = labels.shape[0]
    hue = (labels + rng.uniform(-0.3, 0.3, n)) / 8
    radius = rng.uniform(2.5, 5.0, n)
    cover = coverage_from_sdf(shape_sdf(rng.integers(0, 6, n), _uniform_centres(rng, n, radius), radius, rng.uniform(0, 6.3, n)))
    grey = rng.uniform(0.1, 0.6, n)
    canvas = np.broadcast_to(grey[:, None, None, None], (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    return paint(canvas, cover, random_colours(rng, n, hue=hue, saturation=(0.5, 1.0), value=(0.5, 1.0)))


def _position(rng, labels, split):
    n = labels.shape[0]
    cell = IMAGE_SIZE / 3
    centre = np.stack([(labels // 3 + rng.uniform(0.25, 0.75, n)) * cell, (labels % 3 + rng.uniform(0.25, 0.75, n)) * cell], 1)
    cover = coverage_from_sdf(shape_sdf(rng.integers(0, 6, n), centre, rng.uniform(1.5, 2.5, n), rng.uniform(0, 6.3, n)))
    return paint(dark_backgrounds(rng, n), cover, random_colours(rng, n))


def _font(characters: str, *, scale_range, centre_jitter):
    bank = glyphs(characters)

    def render(rng, labels, split):
        if centre_jitter is None:  # anywhere in the image (small characters)
            n = labels.shape[0]
            scale = rng.uniform(*scale_range, (n, 1)) * rng.uniform(0.9, 1.1, (n, 2))
            cover = sample_bitmaps(
                bank[labels], centre=_uniform_centres(rng, n, 6.0), scale=scale, shear=rng.uniform(-0.15, 0.15, n)
            )
            return two_colour_image(rng, np.clip(cover, 0, 1))
        return _digit_canvas(
            rng, bank[labels], scale_range=scale_range, centre_jitter=centre_jitter, angle_deg=8, shear=0.15, colourful=True
        )

    return render


_SIZE_RADII = np.array([1.5, 2.5, 3.5, 4.5, 5.5])


def _size(rng, labels, split):
    n = labels.shape[0]
    radius = _SIZE_RADII[labels] + rng.uniform(-0.3, 0.3, n)
    kind = rng.choice(np.array([0, 1]), n)
    cover = coverage_from_sdf(shape_sdf(kind, _uniform_centres(rng, n, radius + 0.5), radius, rng.uniform(0, 6.3, n)))
    return paint(dark_backgrounds(rng, n), cover, random_colours(rng, n))


_DIRECTIONS = ("left", "right", "above", "below")


def _relative_position(rng, labels, split):
    n = labels.shape[0]
    along = rng.uniform(5.0, 9.0, n)
    across = rng.uniform(-2.0, 2.0, n)
    # Offset of the circle from the square, (dy, dx) per class.
    unit = np.array([[0, -1], [0, 1], [-1, 0], [1, 0]], np.float64)[labels]
    offset = unit * along[:, None] + unit[:, ::-1] * across[:, None]
    low = np.maximum(2.5, 2.5 - offset)
    high = np.minimum(IMAGE_SIZE - 2.5, IMAGE_SIZE - 2.5 - offset)
    square = low + rng.random((n, 2)) * (high - low)
    circle = square + offset
    canvas = dark_backgrounds(rng, n)
    canvas = paint(canvas, coverage_from_sdf(shape_sdf(np.ones(n, int), square, np.full(n, 2.6))), random_colours(rng, n))
    return paint(canvas, coverage_from_sdf(shape_sdf(np.zeros(n, int), circle, np.full(n, 2.2))), random_colours(rng, n))


def _gradient(rng, labels, split):
    n = labels.shape[0]
    angle = labels * np.pi / 4 + rng.uniform(-np.pi / 12, np.pi / 12, n)
    a = angle[:, None, None]
    t = (np.cos(a) * (_XX[None] - 8) + np.sin(a) * (_YY[None] - 8)) / 16 + 0.5
    ramp = np.clip(0.5 + rng.uniform(0.6, 1.0, n)[:, None, None] * (t - 0.5), 0, 1)[..., None]
    # Always dark -> bright along the labelled direction (a two_colour_image swap would flip it).
    dark = random_colours(rng, n, saturation=(0.0, 1.0), value=(0.0, 0.3))
    bright = random_colours(rng, n, saturation=(0.0, 1.0), value=(0.7, 1.0))
    return dark[:, None, None, :] * (1 - ramp) + bright[:, None, None, :] * ramp


def _fill_style(rng, labels, split):
    n = labels.shape[0]
    radius = rng.uniform(4.0, 6.5, n)
    centre = _uniform_centres(rng, n, radius * 0.8)
    kind = rng.choice(np.array([0, 1]), n)
    sdf = shape_sdf(kind, centre, radius, rng.uniform(0, 6.3, n))
    inside = coverage_from_sdf(sdf)
    outline = coverage_from_sdf(np.abs(sdf + 0.6) - 0.6)
    stripes = inside * (np.floor(_YY[None] + rng.integers(0, 2, n)[:, None, None]) % 2)
    dots = inside * ((np.floor(_YY[None]) % 2 == 0) & (np.floor(_XX[None]) % 2 == 0))
    cover = np.take_along_axis(np.stack([inside, outline, stripes, dots]), labels[None, :, None, None], axis=0)[0]
    return paint(dark_backgrounds(rng, n), cover, random_colours(rng, n))


_SYMMETRY_NAMES = ("left-right", "top-bottom", "both", "none")


def _symmetry(rng, labels, split):
    n = labels.shape[0]
    blocks = (rng.random((n, 8, 8)) < 0.5).astype(np.float64)
    lr = np.concatenate([blocks[:, :, :4], blocks[:, :, :4][:, :, ::-1]], axis=2)
    tb = np.concatenate([blocks[:, :4], blocks[:, :4][:, ::-1]], axis=1)
    both = np.concatenate([lr[:, :4], lr[:, :4][:, ::-1]], axis=1)
    pattern = np.take_along_axis(np.stack([lr, tb, both, blocks]), labels[None, :, None, None], axis=0)[0]
    return two_colour_image(rng, np.kron(pattern, np.ones((1, 2, 2))))


def _odd_one_out(rng, labels, split):
    n = labels.shape[0]
    base = rng.random(n)
    canvas = dark_backgrounds(rng, n, max_value=0.25)
    odd_hue = base + rng.choice(np.array([-1.0, 1.0]), n) * rng.uniform(0.3, 0.5, n)
    kind = rng.integers(0, 6, n)
    for quadrant in range(4):
        centre = np.stack([np.full(n, 4.0 + 8 * (quadrant // 2)), np.full(n, 4.0 + 8 * (quadrant % 2))], 1)
        centre = centre + rng.uniform(-1.0, 1.0, (n, 2))
        hue = np.where(labels == quadrant, odd_hue, base + rng.uniform(-0.03, 0.03, n))
        cover = coverage_from_sdf(shape_sdf(kind, centre, rng.uniform(2.2, 3.2, n), rng.uniform(0, 6.3, n)))
        canvas = paint(canvas, cover, random_colours(rng, n, hue=hue, saturation=(0.7, 1.0), value=(0.7, 1.0)))
    return canvas


def _frequency(rng, labels, split):
    n = labels.shape[0]
    cycles = (labels + 1.5 + rng.uniform(-0.3, 0.3, n)) / IMAGE_SIZE
    return two_colour_image(rng, grating(rng.uniform(0, np.pi, n), cycles, rng.uniform(0, 2 * np.pi, n)))


def _names(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(count))


TASKS: tuple[Task, ...] = (
    Task("shapes", SHAPE_NAMES, 0.15, _shapes, "shape of one rotated object"),
    Task("stripes", tuple(f"{22.5 * i:g} deg" for i in range(8)), 0.3, _stripes, "grating orientation"),
    Task("sklearn_digits", tuple("0123456789"), 0.25, _sklearn_digits_task, "handwritten digit (scikit-learn)"),
    Task("textures", _TEXTURE_NAMES, 0.2, _textures, "texture type"),
    Task("count", tuple(str(i) for i in range(1, 6)), 0.15, _count, "number of dots"),
    Task("font_digits", tuple("0123456789"), 0.2, _font("0123456789", scale_range=(1.5, 2.0), centre_jitter=1.5), "printed digit"),
    Task("colours", _names("hue", 8), 0.2, _colours, "hue of one blob"),
    Task("position", _names("cell", 9), 0.3, _position, "3x3 cell of a small object"),
    Task("letters_a_j", tuple("ABCDEFGHIJ"), 0.2, _font("ABCDEFGHIJ", scale_range=(1.5, 2.0), centre_jitter=1.5), "printed letter A-J"),
    Task("size", tuple(f"r={r:g}" for r in _SIZE_RADII), 0.2, _size, "radius of one shape"),
    Task("sklearn_digits_colour", tuple("0123456789"), 0.15, _sklearn_digits_colour, "handwritten digit, random colours"),
    Task("relative_position", _DIRECTIONS, 0.2, _relative_position, "circle relative to square"),
    Task("gradient", _names("dir", 8), 0.3, _gradient, "direction of a brightness ramp"),
    Task("fill_style", ("filled", "outline", "striped", "dotted"), 0.15, _fill_style, "how a shape is filled"),
    Task("sklearn_digits_rotation", ("0", "90", "180", "270"), 0.2, _sklearn_digits_rotation, "rotation of a handwritten digit"),
    Task("symmetry", _SYMMETRY_NAMES, 0.2, _symmetry, "mirror symmetry of a block pattern"),
    Task("letters_k_t", tuple("KLMNOPQRST"), 0.15, _font("KLMNOPQRST", scale_range=(1.3, 1.6), centre_jitter=None), "small printed letter K-T"),
    Task("odd_one_out", ("top-left", "top-right", "bottom-left", "bottom-right"), 0.2, _odd_one_out, "quadrant of the odd hue"),
    Task("frequency", tuple(f"{c + 1.5:g} cycles" for c in range(5)), 0.25, _frequency, "grating spatial frequency"),
    Task("sklearn_digits_small", tuple("0123456789"), 0.1, _sklearn_digits_small, "small handwritten digit amid clutter"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
MAX_CLASSES: int = max(t.num_classes for t in TASKS)


def get_tasks(names: Sequence[str] | int | None = None) -> tuple[Task, ...]:
    """Tasks by name, the first ``k`` tasks for an int, or all of them."""
    if names is None:
        return TASKS
    if isinstance(names, int):
        if not 1 <= names <= len(TASKS):
            raise ValueError(f"number of tasks must be in [1, {len(TASKS)}], got {names}.")
        return TASKS[:names]
    by_name = {t.name: t for t in TASKS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASK_NAMES)}.")
    return tuple(by_name[n] for n in names)


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------
def split_seed(seed: int, task: Task, split: str) -> np.random.SeedSequence:
    """Independent, reproducible stream per (run seed, task, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    digest = hashlib.sha256(f"{task.name}/{split}".encode()).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` labels, each class ``floor(n / C)`` or one more times, shuffled."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int32)


def add_noise(rng: np.random.Generator, images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian pixel noise, clipped to ``[0, 1]``."""
    return np.clip(images + sigma * rng.standard_normal(images.shape), 0.0, 1.0)


# ----------------------------------------------------------------------------
# Input domains
# ----------------------------------------------------------------------------
# The contrast kept by a domain style's colour mixing: a rotation of the centred colours, shrunk so
# that most pixels stay inside [0, 1] after the background pattern is added.
_STYLE_CONTRAST = 0.8


def domain_style(task_name: str, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """The fixed look of a task's images: ``(mixing (3, 3), pattern (16, 16, 3))``.

    Real multi-task suites are different datasets, each with its own look (satellite
    tiles, scanned digits, photographs of signs), so a change that one expert makes for
    its inputs need not touch another's. The generated tasks share one look (objects on
    dark canvases), which makes every expert interfere with every other one. A style
    gives each task its own: an orthogonal colour mixing ``Q`` (a random rotation or
    reflection of RGB around mid-grey) and a smooth background pattern ``P`` (two random
    low-frequency gratings per channel, peak amplitude up to ``amplitude``):
    ``styled = clip(0.8 Q (x - 0.5) + 0.5 + P, 0, 1)``. Both depend on the task's name
    only (not on the run seed), as a dataset's look does; a regrouped task
    (``parent__rule``, `subboost.bench.suites.vision.task_variants`) keeps its parent's look.
    """
    root = task_name.split("__")[0]
    digest = hashlib.sha256(f"style/{root}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    mixing = q * np.sign(np.diag(r))
    yy, xx = _YY[..., None] / IMAGE_SIZE, _XX[..., None] / IMAGE_SIZE
    pattern = np.zeros((IMAGE_SIZE, IMAGE_SIZE, CHANNELS))
    for _ in range(2):
        frequency = rng.uniform(0.5, 2.0, 2) * rng.choice([-1, 1], 2)  # cycles per image, (y, x)
        phase = rng.uniform(0.0, 2 * np.pi, CHANNELS)
        weight = rng.uniform(0.5, 1.0, CHANNELS)
        pattern += weight * np.sin(2 * np.pi * (frequency[0] * yy + frequency[1] * xx) + phase)
    return mixing, pattern * (amplitude / 2)


def apply_domain_style(images: np.ndarray, task_name: str, amplitude: float) -> np.ndarray:
    """``images`` (n, 16, 16, 3) in ``[0, 1]`` in the task's look (`domain_style`); float32."""
    mixing, pattern = domain_style(task_name, amplitude)
    styled = (np.asarray(images, np.float32) - 0.5) @ mixing.T * _STYLE_CONTRAST + 0.5 + pattern
    return np.clip(styled, 0.0, 1.0).astype(np.float32)


def generate(task: Task, split: str, n: int, *, seed: int, noisy: bool = True,
             style: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (float32, ``(n, 16, 16, 3)``, in ``[0, 1]``) and int32 labels of ``task``.

    Args:
      task: the task.
      split: ``"train"``, ``"val"``, ``"test"`` or ``"pretrain"`` (each its own stream).
      n: number of examples (labels balanced over classes).
      seed: run seed; the same (seed, task, split, n) always gives the same arrays.
      noisy: add the task's pixel noise (training adds fresh noise per step instead).
      style: amplitude of the task's input domain (`domain_style`), applied to the clean
        images before the noise; 0 leaves every task in the shared look.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not 0.0 <= style <= 1.0:
        raise ValueError(f"style must lie in [0, 1], got {style}.")
    rng = np.random.default_rng(split_seed(seed, task, split))
    labels = balanced_labels(rng, n, task.num_classes)
    images = task.render(rng, labels, split)
    if style:
        images = apply_domain_style(np.clip(images, 0.0, 1.0), task.name, style)
    if noisy:
        images = add_noise(rng, images, task.noise)
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels


def coarse_labels(task: Task, labels: np.ndarray) -> np.ndarray:
    """Pretraining label: the pair of neighbouring classes, ``label // 2``."""
    del task  # the same rule for every task
    return (np.asarray(labels) // 2).astype(np.int32)


def num_coarse_labels(task: Task) -> int:
    """``ceil(num_classes / 2)``."""
    return (task.num_classes + 1) // 2


def normalise(images):
    """Pixels in ``[0, 1]`` -> model input."""
    return (images - PIXEL_MEAN) / PIXEL_STD
