"""A synthetic captioned dataset: one coloured geometric shape on a coloured background, 64x64 RGB.

Every image is drawn from a seed alone (Pillow, 4x supersampled then box-filtered, so edges are anti-aliased):
the same ``(seed, n)`` always gives the same images, captions and labels, on any machine.

- shapes: circle, square, triangle (an upright isosceles triangle filling its bounding box);
- colours, for the shape and the background (never the same): red, green, blue, yellow, white, black;
- the shape's bounding box is ``size`` pixels on a side (default 24..44) and lies at least ``MARGIN`` pixels
  inside the image, so the shape is fully visible and the image corners are always background;
- captions read exactly ``"a red circle on a blue background"``.

Labels are integer indices into :data:`SHAPES` and :data:`COLORS` (``shape``, ``color``, ``background``).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 24, 44
MARGIN = 3
_SUPERSAMPLE = 4


def caption(shape: int, color: int, background: int) -> str:
    """``"a red circle on a blue background"`` for label indices."""
    return f"a {COLORS[color]} {SHAPES[shape]} on a {COLORS[background]} background"


def all_label_triples() -> list[tuple[int, int, int]]:
    """Every (shape, colour, background) combination the dataset draws from: 3 * 6 * 5 = 90."""
    return [(s, c, b) for s, c, b in itertools.product(range(len(SHAPES)), range(len(COLORS)), range(len(COLORS)))
            if c != b]


@dataclasses.dataclass(frozen=True)
class Batch:
    """``images`` (N, 64, 64, 3) float32 in [0, 1]; ``labels`` (N, 3) int32 (shape, colour, background);
    ``captions`` N strings; ``centers`` (N, 2) float32 (x, y) of a point well inside the shape (its
    bounding-box centre; for the triangle, its centroid); ``sizes`` (N,) bounding-box side in pixels."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    centers: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)


def draw(shape: int, color: int, background: int, x0: float, y0: float, size: float,
         image_size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (H, W, 3) float32 in [0, 1]: the shape's bounding box has top-left (x0, y0) and side ``size``
    (pixels, may be fractional)."""
    s = _SUPERSAMPLE
    big = Image.new("RGB", (image_size * s, image_size * s), RGB[COLORS[background]])
    pen = ImageDraw.Draw(big)
    fill = RGB[COLORS[color]]
    left, top, right, bottom = x0 * s, y0 * s, (x0 + size) * s - 1, (y0 + size) * s - 1
    if SHAPES[shape] == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif SHAPES[shape] == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    small = big.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def shape_center(shape: int, x0: float, y0: float, size: float) -> tuple[float, float]:
    """A point well inside the shape: the box centre, or the triangle's centroid (2/3 of the way down)."""
    if SHAPES[shape] == "triangle":
        return x0 + size / 2, y0 + 2 * size / 3
    return x0 + size / 2, y0 + size / 2


def sample_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) int32 labels, uniform over the 90 valid combinations."""
    triples = np.asarray(all_label_triples(), np.int32)
    return triples[rng.integers(0, len(triples), n)]


def make_batch(seed: int, n: int, *, labels: np.ndarray | None = None, min_size: float = MIN_SIZE,
               max_size: float = MAX_SIZE) -> Batch:
    """``n`` images drawn from ``seed`` (deterministic). ``labels`` (n, 3) fixes what is drawn; the position
    and size are still random."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = sample_labels(rng, n)
    labels = np.asarray(labels, np.int32).reshape(n, 3)
    if np.any(labels[:, 1] == labels[:, 2]):
        raise ValueError("the shape colour must differ from the background colour")
    sizes = rng.uniform(min_size, max_size, n).astype(np.float32)
    room = IMAGE_SIZE - 2 * MARGIN - sizes
    x0 = (MARGIN + rng.uniform(0, 1, n) * room).astype(np.float32)
    y0 = (MARGIN + rng.uniform(0, 1, n) * room).astype(np.float32)
    images = np.stack([draw(*map(int, lab), x, y, s) for lab, x, y, s in zip(labels, x0, y0, sizes, strict=True)])
    centers = np.asarray([shape_center(int(lab[0]), x, y, s) for lab, x, y, s in zip(labels, x0, y0, sizes,
                                                                                        strict=True)], np.float32)
    return Batch(images=images, labels=labels, captions=[caption(*map(int, lab)) for lab in labels],
                 centers=centers, sizes=sizes)


def iterate(seed: int, batch_size: int):
    """An endless, reproducible stream of batches: batch i is ``make_batch(hash(seed, i), batch_size)``."""
    for i in itertools.count():
        yield make_batch(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), batch_size)
