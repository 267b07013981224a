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
from tests.test_pipeline import SCHEDULERS

SCHEDULERS_BY_NAME = {name: spec for (name, sigmas), spec in SCHEDULERS.items() if sigmas is None}


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


def test_every_sampler_has_its_diffusers_timestep_count() -> None:
    """diffusers' loop runs over ``len(scheduler.timesteps)`` evaluations: N for first-order schedulers, 2N - 1
    for the second-order ones (the set :func:`diffusers_evaluation` knows), N + 1 for PNDM. Every sampler of the
    registry is one of these (a new second-order sampler must be added to ``SECOND_ORDER``)."""
    from sdjax.control import SECOND_ORDER, diffusers_evaluation
    from sdjax.samplers.registry import SAMPLERS
    from tests.reference.tiny_pipelines import SD1_SCHEDULER

    assert set(SCHEDULERS_BY_NAME) == set(SAMPLERS)
    assert SECOND_ORDER <= set(SAMPLERS)
    for name, (cls, overrides) in SCHEDULERS_BY_NAME.items():
        for steps in (1, 2, 7):
            reference = cls.from_config({**SD1_SCHEDULER, **overrides})
            reference.set_timesteps(steps)
            assert int(diffusers_evaluation(name, 0, 0, steps)[1]) == len(reference.timesteps), (name, steps)


# the samplers with two evaluations in a step, and two with one
@pytest.mark.parametrize("sampler", ["heun", "dpm2", "dpmpp_sde", "pndm", "euler", "unipc"])
def test_evaluation_index_is_diffusers_loop_counter(sampler: str, fast_compile) -> None:
    """ControlNet start/end (and the SDXL adapter factor) index diffusers' ``enumerate(scheduler.timesteps)``:
    model evaluations, not steps (Heun, DPM2, DPM++ SDE list 2N - 1 timesteps, PNDM N + 1). The sampler's
    evaluations, as the loop traces them, map onto 0..len(timesteps)-1 once each and in order, and the timestep
    of evaluation i is diffusers' ``timesteps[i]``; also for image-to-image (the timesteps from t_start on)."""
    import jax
    import jax.numpy as jnp

    from sdjax.control import diffusers_evaluation
    from sdjax.guidance.methods import Conditional
    from sdjax.samplers import SchedulerConfig, add_noise, make_schedule, sample
    from sdjax.samplers.denoiser import takes_evaluation
    from tests.reference.tiny_pipelines import SD1_SCHEDULER

    cls, overrides = SCHEDULERS_BY_NAME[sampler]
    steps = 6
    schedule = make_schedule(SchedulerConfig.from_dict(SD1_SCHEDULER), sampler, steps)
    seen: list[tuple[int, int, float]] = []

    @takes_evaluation
    def passes_fn(x, t, passes, evaluation=None):
        i, k = evaluation
        jax.debug.callback(lambda i, t, k=k: seen.append((int(i), k, float(t))), i, t)
        return {p: jnp.zeros_like(x) for p in passes}

    @jax.jit
    def run(t_start):  # traced: one compile for both starts
        x = add_noise(schedule, jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 2, 2, 1)), t_start)
        return sample(passes_fn, x, schedule, guidance=Conditional(), start_step=t_start,
                      keys=jax.random.split(jax.random.key(0), 1))

    for t_start in (0, 2):
        seen.clear()
        jax.block_until_ready(run(t_start))
        indices = [diffusers_evaluation(sampler, i - t_start, k, steps - t_start) for i, k, _ in seen]
        reference = cls.from_config({**SD1_SCHEDULER, **overrides})
        reference.set_timesteps(steps)
        timesteps = reference.timesteps.numpy()[t_start * reference.order:]
        what = f"{sampler} from step {t_start}"
        assert [int(i) for i, _ in indices] == list(range(len(timesteps))), what
        assert all(int(n) == len(timesteps) for _, n in indices), what
        if not (sampler == "pndm" and t_start):  # PNDM img2img differs on purpose (see samplers.timestep.pndm)
            np.testing.assert_allclose([t for *_, t in seen], timesteps, rtol=1e-4, atol=1e-3, err_msg=what)
