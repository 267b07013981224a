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
from sdjax.prompts import extract_extra_networks
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


@dataclasses.dataclass(frozen=True, eq=False)
class ControlOptions:
    """One or several ControlNets (diffusers' MultiControlNet) with their images, scales and start/end."""

    nets: tuple[Any, ...]  # sdjax.control.ControlNet
    images: tuple[Any, ...]  # one control image (PIL / array in [0, 1], one or one per prompt) per net
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterOptions:
    """T2I-Adapters (diffusers' MultiAdapter) with their images and weights."""

    adapters: tuple[Any, ...]  # sdjax.t2i_adapter.T2IAdapterModel
    images: tuple[Any, ...]
    scales: tuple[float, ...]
    conditioning_factor: float = 1.0  # SDXL adapter pipeline: features only while i < int(n * factor)


@dataclasses.dataclass(frozen=True, eq=False)
class IPAdapterOptions:
    """IP-Adapter images, one per adapter of the pipeline, and their scales (None: each adapter's own)."""

    adapters: tuple[Any, ...]  # sdjax.ip_adapter.IPAdapter given with ip_adapter= (added to the pipeline's)
    images: tuple[Any, ...]
    scales: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PromptEmbeds:
    """Conditioning made elsewhere, in diffusers' layouts: (B, S, D) contexts, SDXL's (B, P) pooled ones."""

    prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    pooled_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None

    @classmethod
    def build(cls, prompt_embeds: Any, negative_prompt_embeds: Any, pooled: Any, negative_pooled: Any
              ) -> PromptEmbeds:
        def array(value: Any, name: str, ndim: int) -> np.ndarray | None:
            if value is None:
                return None
            value = np.asarray(value, np.float32)
            if value.ndim != ndim:
                raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
            return value

        embeds = cls(array(prompt_embeds, "prompt_embeds", 3),
                     array(negative_prompt_embeds, "negative_prompt_embeds", 3),
                     array(pooled, "pooled_prompt_embeds", 2),
                     array(negative_pooled, "negative_pooled_prompt_embeds", 2))
        batch = embeds.prompt_embeds.shape[0]
        for name in ("negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = getattr(embeds, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"{name} has batch {value.shape[0]}; prompt_embeds has {batch}")
        negative = embeds.negative_prompt_embeds
        if negative is not None and negative.shape != embeds.prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds has shape {negative.shape}; prompt_embeds has "
                             f"{embeds.prompt_embeds.shape} (diffusers requires the same)")
        return embeds


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
    hires_prompt_steps: tuple[int, int] | None = None  # a hires fix's second pass: (first pass, hires) steps
    sdxl_given: frozenset[str] = frozenset()  # the SDXL options passed explicitly (an SD model refuses them)
    guidance_scale: float | None = None  # the plain number given as guidance_scale (LCM embeds it), if any
    emphasis: str = "original"  # A1111's emphasis: "original" (restore the mean), "no_norm", "none" (literal)
    embeds: PromptEmbeds | None = None  # prompt_embeds= and friends instead of text
    control: ControlOptions | None = None
    adapter: AdapterOptions | None = None
    ip_adapter: IPAdapterOptions | None = None

    @property
    def batch(self) -> int:
        return len(self.prompts) if self.embeds is None else self.embeds.prompt_embeds.shape[0]

    @property
    def sweep(self) -> int | None:
        return sweep_size(self.guidance)

    @classmethod
    def build(cls, task: str, prompt: Any, *, negative_prompt: Any = None, num_steps: Any = 30,
              guidance: Method | None = None, guidance_scale: Any = None, guidance_rescale: Any = 0.0,
              sampler: str = "euler", schedule: str | None = None, seed: Any = 0, latents: Any = None,
              height: Any = None, width: Any = None, clip_skip: Any = None, eta: Any = None, output: str = "np",
              image: Any = None, mask: Any = None, strength: Any = None, denoising_start: Any = None,
              denoising_end: Any = None, emphasis: str = "original", prompt_embeds: Any = None,
              negative_prompt_embeds: Any = None, pooled_prompt_embeds: Any = None,
              negative_pooled_prompt_embeds: Any = None, controlnet: Any = None,
              control_image: Any = None, controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
              control_guidance_end: Any = 1.0, guess_mode: Any = False, adapter: Any = None, adapter_image: Any = None,
              adapter_conditioning_scale: Any = 1.0, adapter_conditioning_factor: Any = 1.0, ip_adapter: Any = None,
              ip_adapter_image: Any = None, ip_adapter_scale: Any = None, **sdxl: Any) -> Request:
        """Check the keywords of a task call (each error names the keyword) and build the request."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
        embeds = None
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("give either prompt or prompt_embeds, not both")
            embeds = PromptEmbeds.build(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                        negative_pooled_prompt_embeds)
            prompts = []
        else:
            for name, value in (("negative_prompt_embeds", negative_prompt_embeds),
                                ("pooled_prompt_embeds", pooled_prompt_embeds),
                                ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
                if value is not None:
                    raise ValueError(f"{name} needs prompt_embeds")
            prompts = _prompts(prompt, "prompt")
            if not prompts:
                raise ValueError("prompt is empty: give a string or a non-empty list of strings")
        if embeds is not None and negative_prompt_embeds is not None and negative_prompt is not None:
            raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
        tagged = [p for p in prompts or () if extract_extra_networks(p)[1]]
        if tagged:  # the task methods take them out (lora_dir=); anywhere else they would be encoded as text
            raise ValueError(f"prompt {tagged[0]!r} has extra-network tags (<lora:...>, <hypernet:...>): the "
                             "Pipeline task methods apply them, with lora_dir= / hypernetwork_dir=")
        n = len(prompts) if embeds is None else embeds.prompt_embeds.shape[0]
        negatives = None if negative_prompt is None else _prompts(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1 and n > 1:
            negatives = negatives * n
        if negatives is not None and len(negatives) != n:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but the batch has {n} prompts")
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
        control = _control_options(controlnet, control_image, controlnet_conditioning_scale, control_guidance_start,
                                   control_guidance_end, guess_mode)
        adapters = _adapter_options(adapter, adapter_image, adapter_conditioning_scale, adapter_conditioning_factor)
        ip = _ip_adapter_options(ip_adapter, ip_adapter_image, ip_adapter_scale)
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
            sdxl_given=frozenset(sdxl),
            emphasis=emphasis,
            embeds=embeds,
            control=control,
            adapter=adapters,
            ip_adapter=ip,
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


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _per_model(value: Any, n: int, name: str, models: str) -> list[float]:
    """A number, or a list with one number per model."""
    values = _listed(value)
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} {models}")
    return [_number(v, name) for v in values]


def _images_per_model(value: Any, n: int, name: str, models: str) -> list[Any]:
    """One image per model: with one model the value itself (an image, a batch, a list of per-prompt images);
    with several a list of as many entries."""
    if value is None:
        raise ValueError(f"{name} is missing: the {models} need an image")
    values = [value] if n == 1 else _listed(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} {models} (give one image per model)")
    for v in values:
        if isinstance(v, str | bytes) or hasattr(v, "__fspath__"):
            raise TypeError(f"{name}: give PIL images or arrays in [0, 1], not a path "
                            f"(open it with PIL.Image.open({v!r}))")
    return values


def _control_options(controlnet: Any, image: Any, scale: Any, start: Any, end: Any, guess_mode: Any
                     ) -> ControlOptions | None:
    if controlnet is None:
        if image is not None:
            raise ValueError("control_image was given without controlnet=")
        return None
    from sdjax.control import ControlNet, guidance_ranges

    nets = _listed(controlnet)
    if not nets or not all(isinstance(n, ControlNet) for n in nets):
        raise TypeError("controlnet must be a ControlNet from sdjax.load_controlnet(path) or a list of them")
    images = _images_per_model(image, len(nets), "control_image", "ControlNets")
    scales = _per_model(scale, len(nets), "controlnet_conditioning_scale", "ControlNets")
    for name, value in (("control_guidance_start", start), ("control_guidance_end", end)):
        for v in _listed(value):
            _number(v, name)
    starts, ends = guidance_ranges(len(nets), start, end)
    if not isinstance(guess_mode, bool | np.bool_):
        raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")
    return ControlOptions(tuple(nets), tuple(images), tuple(scales), tuple(starts), tuple(ends), bool(guess_mode))


def _adapter_options(adapter: Any, image: Any, scale: Any, factor: Any) -> AdapterOptions | None:
    if adapter is None:
        if image is not None:
            raise ValueError("adapter_image was given without adapter=")
        return None
    from sdjax.t2i_adapter import T2IAdapterModel

    adapters = _listed(adapter)
    if not adapters or not all(isinstance(a, T2IAdapterModel) for a in adapters):
        raise TypeError("adapter must be a T2I-Adapter from sdjax.load_t2i_adapter(path) or a list of them")
    images = _images_per_model(image, len(adapters), "adapter_image", "T2I-Adapters")
    scales = _per_model(scale, len(adapters), "adapter_conditioning_scale", "T2I-Adapters")
    factor = _number(factor, "adapter_conditioning_factor")
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"adapter_conditioning_factor must be in [0, 1], got {factor}")
    return AdapterOptions(tuple(adapters), tuple(images), tuple(scales), factor)


def _ip_adapter_options(adapter: Any, image: Any, scale: Any) -> IPAdapterOptions | None:
    adapters: list[Any] = []
    if adapter is not None:
        from sdjax.ip_adapter import IPAdapter

        adapters = _listed(adapter)
        if not all(isinstance(a, IPAdapter) for a in adapters):
            raise TypeError("ip_adapter must be an IP-Adapter from sdjax.load_ip_adapter(...) or a list of them "
                            "(or use pipe.with_ip_adapter(path, image_encoder=FOLDER))")
    if image is None:
        if adapters or scale is not None:
            raise ValueError("ip_adapter_image is missing: an IP-Adapter needs an image")
        return None
    # As diffusers: one entry per adapter (each an image or a list of images); the number of adapters is the
    # pipeline's plus these, which prepare() checks.
    images = _listed(image)
    for v in images:
        if isinstance(v, str | bytes) or hasattr(v, "__fspath__"):
            raise TypeError("ip_adapter_image: give PIL images or arrays, not a path")
    scales = None if scale is None else tuple(_number(v, "ip_adapter_scale") for v in _listed(scale))
    return IPAdapterOptions(tuple(adapters), tuple(images), scales)


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
