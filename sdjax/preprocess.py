"""Control-image preprocessors that need no model weights: Canny edges, a Sobel line map (lineart-like),
grayscale. They run OpenCV (the optional ``control`` extra: ``pip install 'sdjax[control]'``, i.e.
opencv-python-headless). Depth, pose and other model-based annotators are out of scope.

Each takes a PIL image or an (H, W, 3) uint8 / [0, 1] float array and returns an RGB PIL image, the form
ControlNet pipelines take as ``control_image``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ImportError("sdjax's control-image preprocessors need OpenCV: pip install 'sdjax[control]' "
                          "(or pip install opencv-python-headless)") from None
    return cv2


def _rgb_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"a control image must be (H, W, 3); got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError("a float control image must hold values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _to_pil(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))


def canny(image: Image.Image | np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """White Canny edges on black (``cv2.Canny`` on the RGB image, as diffusers' ControlNet examples and
    controlnet_aux's CannyDetector do), the input of the canny ControlNets."""
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny thresholds need 0 <= low <= high; got {low_threshold}, {high_threshold}")
    return _to_pil(_cv2().Canny(_rgb_uint8(image), low_threshold, high_threshold))


def sobel_lines(image: Image.Image | np.ndarray, blur: int = 3) -> Image.Image:
    """A lineart-like map: Sobel gradient magnitude of the (Gaussian-blurred) grayscale image, scaled so the
    strongest edge is white, on black. Not the lineart annotator's learned lines, but the same polarity."""
    cv2 = _cv2()
    if blur < 0 or (blur and blur % 2 == 0):
        raise ValueError(f"sobel blur must be 0 or an odd kernel size; got {blur}")
    gray = cv2.cvtColor(_rgb_uint8(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if blur:
        gray = cv2.GaussianBlur(gray, (blur, blur), 0)
    magnitude = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    peak = float(magnitude.max())
    lines = magnitude / peak if peak > 0 else magnitude
    return _to_pil(np.round(lines * 255).astype(np.uint8))


def grayscale(image: Image.Image | np.ndarray) -> Image.Image:
    """The image's luminance as RGB (for recolor / grayscale-conditioned ControlNets)."""
    cv2 = _cv2()
    return _to_pil(cv2.cvtColor(_rgb_uint8(image), cv2.COLOR_RGB2GRAY))


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {"canny": canny, "lineart": sobel_lines,
                                                        "grayscale": grayscale}


def preprocess(name: str, image: Image.Image | np.ndarray, **options: Any) -> Image.Image:
    """Run the preprocessor ``name`` (one of :data:`PREPROCESSORS`; ``"none"`` returns the image as RGB)."""
    if name == "none":
        return Image.fromarray(_rgb_uint8(image))
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown control preprocessor {name!r}; choose one of none, {', '.join(PREPROCESSORS)} "
                         "(depth and pose need their own models and are not part of sdjax)")
    return PREPROCESSORS[name](image, **options)
