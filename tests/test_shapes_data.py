"""The synthetic shapes dataset: deterministic, captions agree with labels, pixels agree with captions."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sdjax.data import shapes

N = 90


@pytest.fixture(scope="module")
def batch() -> shapes.Batch:
    return shapes.make_batch(7, N)


def test_arrays(batch):
    assert batch.images.shape == (N, 64, 64, 3) and batch.images.dtype == np.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert batch.labels.shape == (N, 3) and batch.labels.dtype == np.int32
    assert len(batch) == N and len(batch.captions) == N
    assert np.all(batch.labels[:, 0] < len(shapes.SHAPES))
    assert np.all(batch.labels[:, 1:] < len(shapes.COLORS))
    assert np.all(batch.labels[:, 1] != batch.labels[:, 2])


def test_captions_match_labels(batch):
    pattern = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
    for text, (shape, color, background) in zip(batch.captions, batch.labels, strict=True):
        m = pattern.match(text)
        assert m, text
        assert m.groups() == (shapes.COLORS[color], shapes.SHAPES[shape], shapes.COLORS[background])
    assert shapes.caption(0, 0, 2) == "a red circle on a blue background"


def test_deterministic_and_seeded():
    a, b, c = shapes.make_batch(3, 12), shapes.make_batch(3, 12), shapes.make_batch(4, 12)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    first = next(shapes.iterate(5, 4))
    np.testing.assert_array_equal(first.images, next(shapes.iterate(5, 4)).images)


def test_all_combinations_are_drawn():
    triples = shapes.all_label_triples()
    assert len(triples) == 90 == len(set(triples))
    drawn = {tuple(map(int, t)) for t in shapes.sample_labels(np.random.default_rng(0), 3000)}
    assert drawn == set(triples)


def test_pixel_colours(batch):
    """The shape's inside has the shape colour, the corners (always background) the background colour."""
    for img, (_, color, background), (cx, cy) in zip(batch.images, batch.labels, batch.centers, strict=True):
        fg = np.asarray(shapes.RGB[shapes.COLORS[color]]) / 255.0
        bg = np.asarray(shapes.RGB[shapes.COLORS[background]]) / 255.0
        np.testing.assert_allclose(img[int(cy), int(cx)], fg, atol=1e-6)
        for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            np.testing.assert_allclose(corner, bg, atol=1e-6)


def test_fully_visible(batch):
    """A border of background pixels surrounds every shape."""
    border = shapes.MARGIN - 1
    for img, (_, _, background) in zip(batch.images, batch.labels, strict=True):
        bg = np.asarray(shapes.RGB[shapes.COLORS[background]]) / 255.0
        edge = np.concatenate([img[:border].reshape(-1, 3), img[-border:].reshape(-1, 3),
                               img[:, :border].reshape(-1, 3), img[:, -border:].reshape(-1, 3)])
        np.testing.assert_allclose(edge, np.broadcast_to(bg, edge.shape), atol=1e-6)


def test_shape_areas(batch):
    """The covered area matches the label: square s^2, circle pi/4 s^2, triangle s^2 / 2."""
    expected_fraction = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for img, (shape, color, background), size in zip(batch.images, batch.labels, batch.sizes, strict=True):
        fg = np.asarray(shapes.RGB[shapes.COLORS[color]]) / 255.0
        bg = np.asarray(shapes.RGB[shapes.COLORS[background]]) / 255.0
        # Fraction of the way from background to shape colour, per pixel (anti-aliased edges count partly).
        axis = int(np.argmax(np.abs(fg - bg)))
        coverage = (img[..., axis] - bg[axis]) / (fg[axis] - bg[axis])
        area = coverage.sum()
        want = expected_fraction[shapes.SHAPES[shape]] * size**2
        assert abs(area - want) < 0.06 * want + 2 * size, (shapes.SHAPES[shape], area, want)


def test_size_range():
    b = shapes.make_batch(1, 200)
    assert b.sizes.min() >= shapes.MIN_SIZE and b.sizes.max() <= shapes.MAX_SIZE
    labels = np.tile(np.asarray([[2, 0, 1]], np.int32), (4, 1))
    fixed = shapes.make_batch(2, 4, labels=labels)
    assert fixed.captions == ["a red triangle on a green background"] * 4
    with pytest.raises(ValueError):
        shapes.make_batch(2, 1, labels=np.asarray([[0, 1, 1]]))
