"""Control-image preprocessors: OpenCV's results on a synthetic image, shapes, polarity and clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from sdjax import preprocess

cv2 = pytest.importorskip("cv2")


def square_image() -> Image.Image:
    """A bright square on a dark, slightly noisy background: edges only on its border."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 20, (40, 56, 3), dtype=np.uint8)
    array[10:30, 15:40] = 230
    return Image.fromarray(array)


def test_canny_is_opencv_canny_as_rgb() -> None:
    image = square_image()
    out = preprocess.canny(image, 50, 150)
    assert out.mode == "RGB" and out.size == image.size
    array = np.asarray(out)
    np.testing.assert_array_equal(array[..., 0], cv2.Canny(np.asarray(image), 50, 150))
    assert (array[..., 0] == array[..., 2]).all()
    assert array[20, 13:17].max() == 255 and array[20, 27].max() == 0  # on the border, inside the square
    float_input = np.asarray(image, np.float32) / 255
    np.testing.assert_array_equal(np.asarray(preprocess.canny(float_input, 50, 150)), array)


def test_sobel_lines_and_grayscale() -> None:
    image = square_image()
    lines = np.asarray(preprocess.sobel_lines(image))
    assert lines.shape == (40, 56, 3) and lines.max() == 255
    assert lines[20, 13:17, 0].max() > 100 and lines[20, 27, 0] < 10  # white on the border, dark inside
    gray = np.asarray(preprocess.grayscale(image))
    np.testing.assert_array_equal(gray[..., 1], cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY))
    assert preprocess.preprocess("none", image).size == image.size
    assert preprocess.preprocess("lineart", image).size == image.size


def test_errors_name_the_problem(monkeypatch) -> None:
    with pytest.raises(ValueError, match="depth and pose"):
        preprocess.preprocess("depth", square_image())
    with pytest.raises(ValueError, match="thresholds"):
        preprocess.canny(square_image(), 200, 100)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess.canny(np.full((4, 4, 3), 2.0))
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if opencv were not installed
    with pytest.raises(ImportError, match=r"sdjax\[control\]"):
        preprocess.canny(square_image())
