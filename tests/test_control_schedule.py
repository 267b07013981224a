"""What diffusers' ControlNet pipelines hand each ControlNet call (recorded on the tiny SD1 pipeline): the
per-step scale is ``scale * controlnet_keep[i]`` over the steps actually run (after img2img's strength cut), the
control image is :func:`prepare_control_image`'s, doubled for CFG outside guess mode, and guess mode runs the
ControlNet on the conditional half only. These are the facts the generation core's wiring relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.control import controlnet_keep, guidance_ranges, prepare_control_image
from tests.reference.control_models import controlnet_for


def record_calls(controlnet) -> list[dict]:
    calls = []
    forward = controlnet.forward

    def spy(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, *args, **kwargs):
        calls.append({"batch": sample.shape[0], "scale": float(conditioning_scale),
                      "guess_mode": kwargs.get("guess_mode"), "cond": controlnet_cond.detach().numpy().copy(),
                      "context_batch": encoder_hidden_states.shape[0]})
        return forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *args, **kwargs)

    controlnet.forward = spy
    return calls


@pytest.mark.parametrize("task", ["text_to_image", "image_to_image"])
def test_pipeline_calls_follow_keep_and_image_rules(tiny, task: str) -> None:
    import diffusers

    t = tiny("sd1")
    base = t.fresh_torch()
    controlnet = controlnet_for(base.unet, seed=5)
    calls = record_calls(controlnet)
    cls = diffusers.StableDiffusionControlNetPipeline if task == "text_to_image" else \
        diffusers.StableDiffusionControlNetImg2ImgPipeline
    pipe = cls(**{k: v for k, v in base.components.items() if k != "image_encoder"}, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    # Euler: one UNet call per step. (PNDM's 9 steps are 10 timesteps, and diffusers' keep is over
    # len(timesteps): the loop's iterations, whatever the scheduler.)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(0)
    control = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    steps, start, end, scale = 9, 0.25, 0.7, 0.8
    extra = {}
    if task == "image_to_image":
        extra = {"image": Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), "strength": 0.6,
                 "control_image": control}
    else:
        extra = {"image": control}
    for guess in (False, True):
        calls.clear()
        pipe(["a cat", "a dog"], height=64, width=96, num_inference_steps=steps, guidance_scale=5.0,
             controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
             guess_mode=guess, output_type="latent", generator=torch.Generator().manual_seed(0), **extra)
        run = len(calls)
        if task == "image_to_image":
            assert run == int(steps * 0.6)  # the strength cut; keep is computed over these steps
        else:
            assert run == steps
        keep = controlnet_keep(run, *guidance_ranges(1, start, end))[:, 0]
        assert [c["scale"] for c in calls] == pytest.approx((scale * keep).tolist())
        image = prepare_control_image(control, 64, 96, batch_size=2)
        expected_batch = 2 if guess else 4  # guess mode: the conditional half only
        for c in calls:
            assert c["batch"] == c["context_batch"] == expected_batch and c["guess_mode"] == guess
            cond = c["cond"].transpose(0, 2, 3, 1)
            np.testing.assert_allclose(cond, np.concatenate([image] * (1 if guess else 2)), atol=1e-6)
