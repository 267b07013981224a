"""Images in and out: PIL / numpy <-> float arrays, masks, and PNG writing with A1111-style metadata."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

ImageInput = Any  # PIL.Image.Image, a list of them, or a numpy array (H, W, C) / (B, H, W, C)


def to_array(images: ImageInput, *, grayscale: bool = False) -> np.ndarray:
    """PIL image(s) or an array -> float32 (B, H, W, C) in [0, 1] (C = 1 for grayscale, else 3)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, Sequence) and images and isinstance(images[0], Image.Image):
        mode = "L" if grayscale else "RGB"
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise ValueError(f"all images of a batch must have one size, got {sorted(sizes)}")
        arr = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images])
        return arr[..., None] if grayscale else arr
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None, ..., None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] in (1, 3, 4) else arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected an image array of shape (H, W, C) or (B, H, W, C), got {arr.shape}")
    arr = arr.astype(np.float32) / 255.0 if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.float32)
    if grayscale and arr.shape[-1] != 1:
        arr = arr[..., :3].mean(axis=-1, keepdims=True)
    elif not grayscale:
        arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError("image arrays must hold values in [0, 1] (floats) or [0, 255] (integers)")
    return arr


def resize_to_multiple(images: ImageInput, multiple: int) -> ImageInput:
    """Shrink PIL images to the nearest multiple of ``multiple`` (as diffusers' image processor does)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, Sequence) and images and isinstance(images[0], Image.Image):
        out = []
        for im in images:
            w, h = (s - s % multiple for s in im.size)
            out.append(im if (w, h) == im.size else im.resize((w, h), Image.Resampling.LANCZOS))
        return out
    return images


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images, rounded as diffusers' ``numpy_to_pil`` does."""
    return [Image.fromarray((np.clip(im, 0.0, 1.0) * 255).round().astype(np.uint8)) for im in images]


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> None:
    """Write atomically (temporary file, then rename) with an A1111 ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
