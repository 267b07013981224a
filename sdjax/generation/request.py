"""One generation request, as the user gave it: typed, validated, and independent of any device.

``Request`` is what ``Pipeline.text_to_image`` / ``image_to_image`` / ``inpaint`` build from their keywords and
what batch jobs will queue; :func:`sdjax.generation.host.prepare` turns it into a static plan and traced
inputs for one model.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sdjax.guidance import CFG, Conditional, Method, sweep_size
from sdjax.samplers import get_sampler

TASKS = ("text", "image", "inpaint")
OUTPUTS = ("np", "pil", "latent")
DEFAULT_GUIDANCE_SCALE = 7.5
MAX_SEED = 2**32


@dataclasses.dataclass(frozen=True)
class SDXLOptions:
    """SDXL's second prompts and micro-conditioning (diffusers' names and meanings)."""

    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def is_default(self) -> bool:
        return self == SDXLOptions()


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything one call generates from. Built by :meth:`build`, which checks every value."""

    task: str
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None = None
    num_steps: int = 30
    guidance: Method = dataclasses.field(default_factory=lambda: CFG(DEFAULT_GUIDANCE_SCALE))
    sampler: str = "euler"
    schedule: str | None = None
    seed: int = 0
    latents: np.ndarray | None = None  # diffusers layout (B, C, h, w), unscaled noise
    height: int | None = None
    width: int | None = None
    clip_skip: int | None = None
    eta: float | None = None
    output: str = "np"
    image: Any = None
    mask: Any = None
    strength: float = 1.0
    denoising_start: float | None = None
    denoising_end: float | None = None
    sdxl: SDXLOptions = SDXLOptions()
    guidance_scale: float | None = None  # the plain number given as guidance_scale (LCM embeds it), if any
    emphasis: str = "original"  # A1111's emphasis: "original" (restore the mean), "no_norm", "none" (literal)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def sweep(self) -> int | None:
        return sweep_size(self.guidance)

    @classmethod
    def build(cls, task: str, prompt: Any, *, negative_prompt: Any = None, num_steps: Any = 30,
              guidance: Method | None = None, guidance_scale: Any = None, guidance_rescale: Any = 0.0,
              sampler: str = "euler", schedule: str | None = None, seed: Any = 0, latents: Any = None,
              height: Any = None, width: Any = None, clip_skip: Any = None, eta: Any = None, output: str = "np",
              image: Any = None, mask: Any = None, strength: Any = None, denoising_start: Any = None,
              denoising_end: Any = None, emphasis: str = "original", **sdxl: Any) -> Request:
        """Check the keywords of a task call (each error names the keyword) and build the request."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
        prompts = _prompts(prompt, "prompt")
        if not prompts:
            raise ValueError("prompt is empty: give a string or a non-empty list of strings")
        negatives = None if negative_prompt is None else _prompts(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but the batch has {len(prompts)} prompts")
        unknown = set(sdxl) - SDXLOptions.names()
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        get_sampler(sampler)  # one ValueError listing the valid names
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")
        if task == "text" and (image is not None or mask is not None):
            raise ValueError("text_to_image takes no image or mask (use image_to_image / inpaint)")
        if task in ("image", "inpaint") and image is None:
            raise ValueError(f"{'image_to_image' if task == 'image' else 'inpaint'} needs an image")
        if task == "inpaint" and mask is None:
            raise ValueError("inpaint needs a mask")
        for name, value in (("image", image), ("mask", mask)):
            if isinstance(value, str | bytes) or hasattr(value, "__fspath__"):
                raise TypeError(f"{name}: give a PIL image or an array in [0, 1], not a path "
                                f"(open it with PIL.Image.open({value!r}))")
        from sdjax.text import check_emphasis

        check_emphasis(emphasis)
        if strength is None:
            strength = 1.0 if task in ("text", "inpaint") else 0.8
        strength = _number(strength, "strength")
        if task != "text" and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        method = resolve_guidance(guidance, guidance_scale, guidance_rescale)
        plain_scale = None
        if guidance is None:
            given = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
            plain_scale = float(given) if isinstance(given, numbers.Real) else None
        return cls(
            task=task,
            prompts=tuple(prompts),
            negative_prompts=None if negatives is None else tuple(negatives),
            num_steps=_positive_int(num_steps, "num_steps"),
            guidance=method,
            guidance_scale=plain_scale,
            sampler=sampler,
            schedule=schedule,
            seed=check_seed(seed),
            latents=None if latents is None else np.asarray(latents, np.float32),
            height=None if height is None else _positive_int(height, "height"),
            width=None if width is None else _positive_int(width, "width"),
            clip_skip=None if clip_skip is None else _nonnegative_int(clip_skip, "clip_skip"),
            eta=None if eta is None else _nonnegative(eta, "eta"),
            output=output,
            image=image,
            mask=mask,
            strength=strength,
            denoising_start=None if denoising_start is None else _number(denoising_start, "denoising_start"),
            denoising_end=None if denoising_end is None else _number(denoising_end, "denoising_end"),
            sdxl=SDXLOptions(**sdxl),
            emphasis=emphasis,
        )


def resolve_guidance(guidance: Method | None, scale: Any, rescale: Any) -> Method:
    """``guidance=`` as given, or ``guidance_scale`` / ``guidance_rescale`` as ``CFG(scale, rescale)``.

    A plain scale <= 1 (and no rescale) runs the conditional pass alone, as diffusers skips the
    unconditional one: a different compiled plan from scales > 1.
    """
    if guidance is not None:
        if scale is not None:
            raise ValueError("give either guidance= (a method from sdjax.guidance) or guidance_scale=, not both")
        if not isinstance(guidance, Method):
            raise TypeError(f"guidance must be a method from sdjax.guidance (e.g. guidance.CFG(7.5)), "
                            f"got {type(guidance).__name__}")
        return guidance
    scale = DEFAULT_GUIDANCE_SCALE if scale is None else scale
    if isinstance(scale, Sequence | np.ndarray) and not isinstance(scale, str):
        scale = np.asarray(scale, np.float32)
        if scale.ndim != 1 or scale.size == 0:
            raise ValueError(f"guidance_scale: a number or a 1-D list of values (a sweep), got shape {scale.shape}")
    elif isinstance(scale, Method) or callable(scale):
        pass  # a schedule (guidance.Linear(7.5), ...)
    else:
        scale = _number(scale, "guidance_scale")
    rescale = _number(rescale, "guidance_rescale")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {rescale}")
    if isinstance(scale, float) and scale <= 1.0:
        return Conditional()
    return CFG(scale, rescale=rescale)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not 0 <= int(seed) < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return int(seed)


def _prompts(value: Any, name: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")
    return list(values)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _nonnegative(value: Any, name: str) -> float:
    value = _number(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonnegative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}={value!r}: must be a non-negative integer")
    return int(value)


ProgressFn = Callable[[int, int], None]
