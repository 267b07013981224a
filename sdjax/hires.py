"""Hires fix as AUTOMATIC1111 does it (``StableDiffusionProcessingTxt2Img.sample_hr_pass``), in one call.

``pipe.text_to_image(..., hires_scale=2.0)``:

1. text-to-image at the base size (``height`` x ``width``);
2. upscale to ``int(size * hires_scale)`` (rounded down to a multiple of the VAE factor, as A1111's latent size
   ``target // 8`` is): in latent space with ``torch.nn.functional.interpolate``'s modes, named as A1111's
   ``shared.latent_upscale_modes`` ("Latent" = bilinear, "Latent (bicubic)", "Latent (nearest)", ... ), or in
   pixels ("Lanczos", "Nearest", "None" = a Lanczos resize) after decoding, the pixels truncated to 8 bits
   first as A1111 does;
3. image-to-image of the upscaled latents (or the re-encoded pixels) with the same prompts, seed, sampler and
   guidance. Steps follow A1111's rule for a hires pass (``setup_img2img_steps`` with explicit steps): it runs
   exactly ``hires_steps`` steps (``None`` or 0: the base pass's steps) at the end of a schedule of
   ``int(hires_steps / min(hires_strength, 0.999))`` steps.

The latents of step 2 go in as clean latents and are noised to the start step with fresh noise of the new size
from each image's seed (A1111: ``ImageRNG`` of the new shape from the same seeds).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

__all__ = ["DEFAULT_STRENGTH", "DEFAULT_UPSCALER", "LATENT_UPSCALERS", "PIXEL_UPSCALERS", "HiresOptions",
           "checked_hires_schedule", "hires_fix", "hires_schedule", "resolve_upscaler", "target_size",
           "upscale_latents", "upscale_pixels"]

# A1111's shared.latent_upscale_modes: name -> (torch.nn.functional.interpolate mode, antialias).
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's built-in pixel upscalers (the model-based ones, ESRGAN and friends, are not here).
PIXEL_UPSCALERS: tuple[str, ...] = ("Lanczos", "Nearest", "None")
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode
DEFAULT_STRENGTH = 0.7  # A1111's hires "Denoising strength" default
OPTIONS = ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler")


def _key(name: str) -> str:
    return " ".join(name.lower().replace("(", " ").replace(")", " ").replace("-", " ").replace("_", " ").split())


_NAMES = {_key(n): n for n in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)}
_NAMES.update({"latent nearest exact": "Latent (nearest-exact)"})


def resolve_upscaler(name: Any) -> str:
    """A1111's upscaler name for ``name`` (any case; ``latent-bicubic`` = "Latent (bicubic)", ``lanczos``)."""
    if not isinstance(name, str):
        raise TypeError(f"hires_upscaler must be a string, got {name!r}")
    canonical = _NAMES.get(_key(name))
    if canonical is None:
        raise ValueError(f"hires_upscaler {name!r} is unknown; choose one of: "
                         f"{', '.join(repr(n) for n in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS))}")
    return canonical


@dataclasses.dataclass(frozen=True)
class HiresOptions:
    scale: float
    strength: float
    steps: int | None  # None: the base pass's steps (A1111's "Hires steps" 0)
    upscaler: str  # A1111's name

    @classmethod
    def build(cls, scale: Any = None, strength: Any = None, steps: Any = None, upscaler: Any = None
              ) -> HiresOptions:
        """Checked options; each error names its keyword."""
        if scale is None:
            raise ValueError("hires_strength, hires_steps and hires_upscaler need hires_scale")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale >= 1.0:
            raise ValueError(f"hires_scale must be a number >= 1, got {scale!r}")
        strength = DEFAULT_STRENGTH if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
            raise ValueError(f"hires_strength must be in (0, 1], got {strength!r}")
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
                raise ValueError(f"hires_steps must be a non-negative integer (0: the base pass's steps), "
                                 f"got {steps!r}")
            steps = int(steps) or None
        return cls(float(scale), float(strength), steps, resolve_upscaler(upscaler or DEFAULT_UPSCALER))

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALERS


def hires_schedule(steps: int, strength: float) -> tuple[int, float]:
    """A1111's hires-pass steps (``setup_img2img_steps(p, steps)``): ``(schedule length T, strength)`` such that
    image-to-image with ``num_steps=T`` runs exactly ``steps`` steps, the last ones of T (``steps / T``: sdjax's
    traced strength rounds ``T * strength`` up when within 1e-6 of an integer)."""
    total = int(steps / min(strength, 0.999))
    return total, steps / total


def checked_hires_schedule(steps: int, strength: float, num_train_timesteps: int) -> tuple[int, float]:
    """:func:`hires_schedule`, refused when its schedule is longer than the model's training schedule."""
    total, fraction = hires_schedule(steps, strength)
    if total > num_train_timesteps:
        raise ValueError(f"hires_strength {strength:g} with {steps} hires steps needs a schedule of {total} steps, "
                         f"more than the model's {num_train_timesteps}: raise hires_strength or lower hires_steps")
    return total, fraction


def target_size(height: int, width: int, scale: float, factor: int = 8) -> tuple[int, int]:
    """The hires size: A1111's ``int(size * hires_scale)``, down to a multiple of ``factor`` (its latent size is
    ``target // 8``)."""
    return int(height * scale) // factor * factor, int(width * scale) // factor * factor


# --- latent upscaling: torch.nn.functional.interpolate's weights, one axis at a time -------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _axis_weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of ``interpolate(size=n_out, mode=mode, align_corners=False, antialias=...)``."""
    w = np.zeros((n_out, n_in), np.float64)
    dst = np.arange(n_out)
    rows = dst[:, None]
    if mode in ("nearest", "nearest-exact"):
        scale = np.float32(n_in) / np.float32(n_out)  # torch computes the source index in float32
        offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
        src = np.minimum(np.floor((dst.astype(np.float32) + offset) * scale).astype(np.int64), n_in - 1)
        if n_out == n_in:
            src = dst
        w[dst, src] = 1.0
        return w
    scale = n_in / n_out
    if antialias:  # PIL-style separable filter (torch's _upsample_*_aa), weights normalised per output
        size = 2 if mode == "bilinear" else 4
        support = size / 2 * scale if scale >= 1.0 else size / 2
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            x = (np.arange(lo, hi) - center + 0.5) * inv
            k = np.maximum(0.0, 1.0 - np.abs(x)) if mode == "bilinear" else _cubic(x, -0.5)
            total = k.sum()
            w[i, lo:hi] = k / total if total != 0 else k
        return w
    src = scale * (dst + 0.5) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        i0 = src.astype(np.int64)
        frac = np.clip(src - i0, 0.0, 1.0)
        i1 = np.minimum(i0 + 1, n_in - 1)
        np.add.at(w, (dst, i0), 1.0 - frac)
        np.add.at(w, (dst, i1), frac)
        return w
    if mode == "bicubic":
        i0 = np.floor(src).astype(np.int64)
        t = src - i0
        for k, x in enumerate((t + 1.0, t, 1.0 - t, 2.0 - t)):
            np.add.at(w, (rows[:, 0], np.clip(i0 - 1 + k, 0, n_in - 1)), _cubic(x, -0.75))
        return w
    raise ValueError(f"unknown interpolation mode {mode!r}")


def upscale_latents(latents: Any, size: tuple[int, int], upscaler: str = DEFAULT_UPSCALER) -> np.ndarray:
    """(B, C, h, w) latents (diffusers' layout) -> (B, C, *size), as A1111's latent upscalers
    (``torch.nn.functional.interpolate`` with that mode and antialias setting)."""
    mode, antialias = LATENT_UPSCALERS[resolve_upscaler(upscaler)]
    x = np.asarray(latents, np.float64)
    if x.ndim != 4:
        raise ValueError(f"latents must be (B, C, h, w), got shape {x.shape}")
    rows = _axis_weights(x.shape[2], size[0], mode, antialias)
    cols = _axis_weights(x.shape[3], size[1], mode, antialias)
    return np.einsum("oh,bchw,pw->bcop", rows, x, cols).astype(np.float32)


def upscale_pixels(images: Any, size: tuple[int, int], upscaler: str = "Lanczos") -> np.ndarray:
    """(B, H, W, 3) pixels in [0, 1] -> (B, *size, 3) float32, as A1111's hires pass: each image truncated to
    8 bits (``(255 * x).astype(uint8)``), resized with Pillow (Lanczos; "Nearest": nearest neighbour), / 255."""
    from PIL import Image

    name = resolve_upscaler(upscaler)
    if name not in PIXEL_UPSCALERS:
        raise ValueError(f"{name!r} is a latent upscaler, not a pixel one")
    resample = Image.Resampling.NEAREST if name == "Nearest" else Image.Resampling.LANCZOS
    height, width = size
    out = []
    for image in np.asarray(images, np.float32):
        pil = Image.fromarray((255.0 * np.clip(image, 0.0, 1.0)).astype(np.uint8))
        out.append(np.asarray(pil.resize((width, height), resample=resample), np.float32) / 255.0)
    return np.stack(out)


# --- the one call ---------------------------------------------------------------------------------------------


def hires_fix(pipe: Any, arguments: dict[str, Any], hires: HiresOptions, networks: tuple[Any, ...] = ()
              ) -> Any:
    """``text_to_image`` with a hires pass: ``arguments`` are text_to_image's (``options`` holding the rest).
    Both passes' requests are built and checked (sizes, memory, step counts) before the first runs."""
    from sdjax.extra_networks import with_networks
    from sdjax.generation import Request, host, run

    arguments = dict(arguments)
    extra = dict(arguments.pop("options"))
    execution = {k: extra.pop(k) for k in ("progress", "mesh", "image_index_offset") if k in extra}
    if extra.get("denoising_end") is not None:
        raise ValueError("hires_scale does not combine with denoising_end (the base hands over clean latents)")
    prompt, output = arguments.pop("prompt"), arguments.pop("output")
    first = Request.build("text", prompt, **arguments, output="latent" if hires.latent else "np", **extra)
    if first.sweep is not None:
        raise ValueError("hires_scale does not combine with a guidance sweep (a list of settings)")
    f = pipe.vae_scale_factor
    implied = None if first.latents is None else (first.latents.shape[2] * f, first.latents.shape[3] * f)
    height = first.height or (implied[0] if implied else pipe.default_size)
    width = first.width or (implied[1] if implied else pipe.default_size)
    size = target_size(height, width, hires.scale, f)
    if min(size) < f:
        raise ValueError(f"hires_scale {hires.scale:g}: the hires size {size[1]}x{size[0]} is too small")
    host.check_size(pipe, *size)
    steps, strength = checked_hires_schedule(hires.steps or first.num_steps, hires.strength,
                                             pipe.scheduler.num_train_timesteps)
    host._check_memory(pipe, first.batch, *size)
    second_args = {k: v for k, v in arguments.items() if k not in ("latents", "height", "width", "num_steps")}
    shape = (first.batch, pipe.vae.config.latent_channels, size[0] // f, size[1] // f)
    placeholder = np.broadcast_to(np.float32(0), shape)  # checks the keywords; the upscaled image replaces it
    second = Request.build("image", prompt, image=placeholder, strength=strength, num_steps=steps,
                           output=output, **second_args, **extra)
    # its prompts scheduled as A1111's hires pass (editing counts on from the first pass)
    second = dataclasses.replace(second, hires_prompt_steps=(first.num_steps, hires.steps or first.num_steps))

    pipe = host.with_request_ip_adapters(with_networks(pipe, networks), first)
    host.prepare(pipe, second)  # the second pass's checks (images, adapters, ...) before the first runs
    base = run(pipe, first, **execution)
    if hires.latent:
        image = upscale_latents(base, (size[0] // f, size[1] // f), hires.upscaler)
    else:
        image = upscale_pixels(base, size, hires.upscaler)
    return run(pipe, dataclasses.replace(second, image=image), **execution)
