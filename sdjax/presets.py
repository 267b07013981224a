"""Few-step presets: the scheduler settings and generation defaults that distilled models need.

Each preset is what the model's own documentation prescribes for diffusers (scheduler class -> sdjax sampler,
``timestep_spacing``, steps, guidance scale). Use one with ``sdjax.load(path, preset=name)`` or
``pipe.with_preset(name)`` (scheduler overrides), and pass :func:`generation_defaults` ``(name)`` to
``text_to_image`` (steps, guidance, sampler)::

    pipe = sdjax.load("sd_xl_base_1.0.safetensors", unet="sdxl_lightning_4step_unet.safetensors",
                      preset="sdxl-lightning-4step")
    images = pipe.text_to_image("a cat", **sdjax.presets.generation_defaults("sdxl-lightning-4step"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sdjax.samplers.registry import get_sampler

_TRAILING = (("timestep_spacing", "trailing"),)


@dataclasses.dataclass(frozen=True)
class Preset:
    """``scheduler``: SchedulerConfig field overrides as (key, value) pairs (hashable); ``weights``: what to load
    and from where (for the README table)."""

    name: str
    sampler: str
    num_steps: int
    guidance_scale: float
    scheduler: tuple[tuple[str, Any], ...] = ()
    weights: str = ""

    @property
    def scheduler_overrides(self) -> dict[str, Any]:
        return dict(self.scheduler)

    def generation_defaults(self) -> dict[str, Any]:
        """``text_to_image`` keyword arguments: ``num_steps``, ``guidance_scale``, ``sampler``."""
        return {"num_steps": self.num_steps, "guidance_scale": self.guidance_scale, "sampler": self.sampler}


def _presets() -> dict[str, Preset]:
    presets = [
        # stabilityai/sd-turbo: "num_inference_steps=1, guidance_scale=0.0"; its scheduler: Euler, trailing.
        Preset("sd-turbo", "euler", 1, 0.0, (*_TRAILING, ("prediction_type", "epsilon")),
               "stabilityai/sd-turbo: sd_turbo.safetensors (single file) or the diffusers folder"),
        # stabilityai/sdxl-turbo: the same settings; its scheduler: Euler Ancestral, trailing.
        Preset("sdxl-turbo", "euler_a", 1, 0.0, _TRAILING,
               "stabilityai/sdxl-turbo: sd_xl_turbo_1.0_fp16.safetensors or the diffusers folder"),
        # latent-consistency/lcm-*: LCMScheduler, 4 steps; the full LCM UNets take guidance as an embedding (w=8).
        Preset("lcm", "lcm", 4, 8.0, (),
               "SimianLuo/LCM_Dreamshaper_v7, latent-consistency/lcm-sdxl (unet=...): full LCM models"),
        # LCM-LoRA: LCMScheduler, 4 steps, guidance 1 (no classifier-free guidance).
        Preset("lcm-lora", "lcm", 4, 1.0, (),
               "latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl: pytorch_lora_weights.safetensors (with_lora)"),
    ]
    for steps in (1, 2, 4, 8):
        # ByteDance/SDXL-Lightning: EulerDiscreteScheduler(timestep_spacing="trailing"), guidance 0; the 1-step
        # model predicts x0 ("prediction_type='sample'").
        scheduler = (*_TRAILING, ("prediction_type", "sample")) if steps == 1 else _TRAILING
        unet = "sdxl_lightning_1step_unet_x0" if steps == 1 else f"sdxl_lightning_{steps}step_unet"
        presets.append(Preset(
            f"sdxl-lightning-{steps}step", "euler", steps, 0.0, scheduler,
            f"ByteDance/SDXL-Lightning: {unet}.safetensors (unet=, onto SDXL base), "
            f"sdxl_lightning_{steps}step.safetensors (full) or _lora.safetensors"))
        # ByteDance/Hyper-SD LoRAs: DDIMScheduler(timestep_spacing="trailing"), guidance 0.
        for base, file in (("sdxl", "Hyper-SDXL"), ("sd15", "Hyper-SD15")):
            presets.append(Preset(
                f"hyper-{base}-{steps}step", "ddim", steps, 0.0, _TRAILING,
                f"ByteDance/Hyper-SD: {file}-{steps}step-lora.safetensors (with_lora, onto the base model)"))
    return {p.name: p for p in presets}


PRESETS: Mapping[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None


def generation_defaults(name: str) -> dict[str, Any]:
    """The preset's ``text_to_image`` keyword arguments (``num_steps``, ``guidance_scale``, ``sampler``)."""
    return get_preset(name).generation_defaults()


for _preset in PRESETS.values():  # every preset names a real sampler
    get_sampler(_preset.sampler)
