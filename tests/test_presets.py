"""Few-step presets: each sets up the schedule its model's documentation prescribes for diffusers (same
timesteps and sigmas), and one runs end to end against diffusers."""

from __future__ import annotations

import dataclasses
import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

import sdjax
from sdjax.convert.single_file import config_dir
from sdjax.pipeline import Pipeline
from sdjax.presets import PRESETS, generation_defaults, get_preset
from sdjax.samplers.registry import make_schedule
from sdjax.samplers.schedules import SchedulerConfig
from tests.conftest import HEIGHT, WIDTH, assert_images_close, noise


def _base(name: str) -> dict:
    family = "sdxl" if "xl" in name else "sd2" if name == "sd-turbo" else "sd1"
    return json.loads((config_dir(family) / "scheduler" / "scheduler_config.json").read_text())


def _documented(name: str, base: dict):
    """The diffusers scheduler as each model card / diffusers doc sets it up."""
    if name == "sd-turbo":
        return diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    if name == "sdxl-turbo":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    if name.startswith("lcm"):
        return diffusers.LCMScheduler.from_config(base)
    if name == "sdxl-lightning-1step":
        return diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing",
                                                            prediction_type="sample")
    if name.startswith("sdxl-lightning"):
        return diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    if name.startswith("hyper-"):
        return diffusers.DDIMScheduler.from_config(base, timestep_spacing="trailing")
    raise AssertionError(f"no documented setup for {name}")


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_schedule_matches_the_documented_diffusers_setup(name: str) -> None:
    preset = get_preset(name)
    base = _base(name)
    scheduler = _documented(name, base)
    scheduler.set_timesteps(preset.num_steps)
    config = SchedulerConfig.from_dict({**base, **preset.scheduler_overrides})
    ours = make_schedule(config, preset.sampler, preset.num_steps)
    np.testing.assert_array_equal(ours.loop_timesteps, scheduler.timesteps.numpy().astype(np.float32))
    if hasattr(scheduler, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, scheduler.sigmas.numpy(), rtol=2e-6)
    else:  # timestep-space schedulers: the noise level of each step's timestep
        alphas = scheduler.alphas_cumprod.numpy()[scheduler.timesteps.numpy()]
        np.testing.assert_allclose(ours.sigmas[:-1], np.sqrt((1 - alphas) / alphas), rtol=2e-6)
    assert config.prediction_type == scheduler.config.prediction_type


def test_generation_defaults_are_text_to_image_keywords() -> None:
    keywords = set(inspect.signature(Pipeline.text_to_image).parameters)
    for name in PRESETS:
        defaults = generation_defaults(name)
        assert set(defaults) <= keywords and set(defaults) == {"num_steps", "guidance_scale", "sampler"}
    assert generation_defaults("sdxl-lightning-4step") == {"num_steps": 4, "guidance_scale": 0.0, "sampler": "euler"}
    with pytest.raises(ValueError, match="unknown preset 'sdxl-lightning-3step'"):
        get_preset("sdxl-lightning-3step")
    with pytest.raises(dataclasses.FrozenInstanceError):  # presets are data
        PRESETS["sdxl-turbo"].num_steps = 2


def test_lightning_preset_end_to_end_matches_diffusers(tiny, fast_compile) -> None:
    """Tiny SDXL with the SDXL-Lightning 4-step preset vs diffusers set up as the model card says."""
    sdxl = tiny("sdxl")
    pipe = sdxl.pipe.with_preset("sdxl-lightning-4step")
    assert pipe.scheduler.timestep_spacing == "trailing"
    assert sdxl.pipe.scheduler.timestep_spacing != "trailing"  # the original is untouched
    ours = pipe.text_to_image(["a cat", "a dog"], latents=noise(), height=HEIGHT, width=WIDTH,
                              **generation_defaults("sdxl-lightning-4step"))
    torch_pipe = sdxl.torch_pipe
    torch_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(sdxl.scheduler_config,
                                                                         timestep_spacing="trailing")
    with torch.no_grad():
        expected = torch_pipe(["a cat", "a dog"], height=HEIGHT, width=WIDTH, num_inference_steps=4,
                              guidance_scale=0.0, latents=torch.from_numpy(noise()), output_type="np").images
    assert_images_close(ours, expected, "SDXL-Lightning 4-step preset")


def test_load_with_preset(tiny) -> None:
    sd1 = tiny("sd1")
    pipe = sdjax.load(sd1.folder, preset="sdxl-lightning-1step")
    assert (pipe.scheduler.timestep_spacing, pipe.scheduler.prediction_type) == ("trailing", "sample")
    assert sdjax.load(sd1.folder, preset="sdxl-lightning-1step", prediction_type="epsilon").scheduler \
        .prediction_type == "epsilon"  # an explicit prediction_type wins over the preset's
