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


RESIZE_MODES = ("just-resize", "crop", "fill")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just-resize") -> Image.Image:
    """Resize as A1111's img2img resize modes do (modules/images.py ``resize_image``, Lanczos):

    - ``just-resize``: stretch to width x height;
    - ``crop``: scale to cover width x height keeping the aspect ratio, centre-crop the overflow;
    - ``fill``: scale to fit inside keeping the aspect ratio, centre it, and fill the borders by stretching
      the image's edge rows or columns.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    lanczos = Image.Resampling.LANCZOS
    if mode == "just-resize" or image.size == (width, height):
        return image if image.size == (width, height) else image.resize((width, height), lanczos)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), lanczos)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill":
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), lanczos, box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), lanczos, box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), lanczos, box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), lanczos, box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def nearest_multiple(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(width, height) rounded to the nearest multiple (at least one multiple)."""
    w, h = (max(multiple, (int(s) + multiple // 2) // multiple * multiple) for s in size)  # halves round up
    return w, h


def mask_warnings(mask: Image.Image) -> list[str]:
    """What may be a mistake in an inpainting mask (it is still read as grey, white = repaint)."""
    notes = []
    rgb = np.asarray(mask.convert("RGB"), dtype=np.int16)
    if mask.mode not in ("1", "L", "LA", "I", "I;16", "F") and np.abs(rgb - rgb[..., :1]).max() > 8:
        notes.append("has colour; it is read as grey (luminance), white = repaint, black = keep")
    grey = np.asarray(mask.convert("L"))
    if (grey < 128).all():
        notes.append("is all black: nothing will be repainted")
    elif (grey >= 128).all():
        notes.append("is all white: the whole image will be repainted")
    return notes


# --- writing: atomically, never replacing a file -----------------------------------------------------------

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MAX_SIZE = {"png": 2**31 - 1, "jpg": 65535, "webp": 16383}  # largest side each format can store
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE = b"UNICODE\0"


def next_index(folder: Path) -> int:
    """A1111's file numbering: one more than the largest number a file name in ``folder`` starts with."""
    largest = -1
    if folder.is_dir():
        for entry in os.scandir(folder):
            digits = entry.name.split("-", 1)[0]
            if digits.isdigit():
                largest = max(largest, int(digits))
    return largest + 1


def write_new(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then link it to ``path``: the file appears
    complete or not at all, and an existing file is never replaced (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_image(image: Image.Image, path: Path, parameters: str | None = None, *, quality: int = 95) -> None:
    """Write ``image`` in the format its suffix names, with A1111's metadata: a PNG ``parameters`` text
    chunk, or for JPEG / WebP the EXIF UserComment (``UNICODE\\0`` + UTF-16-BE, as piexif writes it for A1111).
    Atomic and never replacing a file."""
    kind = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    if kind not in FORMATS:
        raise ValueError(f"unknown image format {path.suffix!r}; choose one of {', '.join(FORMATS)}")
    options: dict[str, Any] = {}
    if kind == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        options["pnginfo"] = info
    else:
        options["quality"] = quality
        if parameters:
            exif = Image.Exif()
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + parameters.encode("utf-16-be")
            options["exif"] = exif.tobytes()
    write_new(path, lambda f: image.save(f, format=FORMATS[kind], **options))


def read_parameters(path: str | Path) -> str | None:
    """The A1111 ``parameters`` text of an image file (PNG text chunk or EXIF UserComment), or None."""
    with Image.open(path) as im:
        if isinstance(getattr(im, "text", None), dict) and "parameters" in im.text:
            return str(im.text["parameters"])
        if "parameters" in im.info:
            return str(im.info["parameters"])
        comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes):
        head, body = comment[:8], comment[8:]
        if head == _UNICODE:
            return body.decode("utf-16-be" if not body.startswith(b"\xff\xfe") else "utf-16", errors="replace")
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return comment if isinstance(comment, str) else None


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> None:
    """Write a PNG atomically (temporary file, then rename: replaces ``path``) with a ``parameters`` chunk."""
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
