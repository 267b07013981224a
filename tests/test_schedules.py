"""Schedules against diffusers' schedulers: timesteps, sigmas, init noise, add_noise, start/end steps."""

from __future__ import annotations

import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)

from sdjax.models.config import ConfigError
from sdjax.samplers import (
    SAMPLERS,
    SchedulerConfig,
    add_noise,
    denoising_end_step,
    denoising_start_step,
    img2img_start_step,
    make_schedule,
    resolve_config,
)
from sdjax.samplers import schedules as S

# scheduler/scheduler_config.json of the public checkpoints (SD 1.5, SD 2.1, SDXL base 1.0).
SD1 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD2 = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
ZERO_SNR = {**SDXL, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}

DIFFUSERS = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "dpm2": (diffusers.KDPM2DiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "ddpm": (diffusers.DDPMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": (diffusers.DPMSolverSDEScheduler, {}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "lcm": (diffusers.LCMScheduler, {}),
}
SIGMA_FLAGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}


def diffusers_scheduler(sampler: str, raw: dict, num_steps: int, kind: str = "default"):
    cls, kwargs = DIFFUSERS[sampler]
    sch = cls.from_config(raw, **kwargs, **SIGMA_FLAGS[kind])
    sch.set_timesteps(num_steps)
    return sch


def per_step_sigmas(sampler: str, sch, num_steps: int) -> np.ndarray:
    """diffusers' sigmas, one per step plus the final one (second-order schedulers repeat theirs)."""
    sig = sch.sigmas.numpy()
    if sampler in ("heun", "dpm2", "dpmpp_sde"):
        sig = np.concatenate([sig[:1], sig[1::2]])[: num_steps + 1]
    return sig


def test_public_configs_parse():
    sd1, sd2, xl = (SchedulerConfig.from_dict(c) for c in (SD1, SD2, SDXL))
    assert (sd1.beta_schedule, sd1.steps_offset, sd1.timestep_spacing) == ("scaled_linear", 1, None)
    assert sd2.prediction_type == "v_prediction" and sd2.set_alpha_to_one is False
    assert xl.timestep_spacing == "leading" and xl.sigma_schedule == "default"
    hash(xl)  # static under jit


@pytest.mark.parametrize(("raw", "message"), [
    ({**SD1, "frobnicate": 3}, "frobnicate"),
    ({**SD1, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({**SD1, "beta_schedule": "sigmoid"}, "beta_schedule"),
    ({**SD1, "timestep_spacing": "sideways"}, "timestep_spacing"),
    ({**SD1, "prediction_type": "flow_prediction"}, "prediction_type"),
    ({**SD1, "use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({**SD1, "interpolation_type": "log_linear"}, "interpolation_type"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig.from_dict(raw)


def test_missing_keys_take_the_samplers_diffusers_defaults():
    cfg = SchedulerConfig.from_dict(SD1)  # no timestep_spacing in the file
    assert resolve_config(cfg, "ddim").timestep_spacing == "leading"
    assert resolve_config(cfg, "euler").timestep_spacing == "linspace"
    assert resolve_config(cfg, "pndm").set_alpha_to_one is False
    assert resolve_config(SchedulerConfig.from_dict(SDXL), "euler").timestep_spacing == "leading"
    # keys a file marks as defaulted are treated as missing, as diffusers' from_config does
    saved = {**SDXL, "_use_default_values": ["timestep_spacing"]}
    assert resolve_config(SchedulerConfig.from_dict(saved), "euler").timestep_spacing == "linspace"
    # DDIM and DDPM clip x0 when the file omits clip_sample, as diffusers' classes default to; others never clip
    no_clip = {k: v for k, v in SD1.items() if k != "clip_sample"}
    assert make_schedule(SchedulerConfig.from_dict(no_clip), "ddim", 10).x0_processing == ("clip", 1.0)
    assert make_schedule(SchedulerConfig.from_dict(no_clip), "ddpm", 10).x0_processing == ("clip", 1.0)
    assert make_schedule(SchedulerConfig.from_dict(no_clip), "euler", 10).x0_processing is None
    assert make_schedule(SchedulerConfig.from_dict(SD1), "ddim", 10).x0_processing is None


@pytest.mark.parametrize("raw", [
    SD1, {**SD1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {**SD1, "beta_schedule": "squaredcos_cap_v2"}, {**SD1, "rescale_betas_zero_snr": True},
])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_alphas_cumprod_match(raw, sampler):
    sch = diffusers_scheduler(sampler, raw, 10)
    ours = S.alphas_cumprod(resolve_config(SchedulerConfig.from_dict(raw), sampler),
                            clamp_zero_snr=sampler == "euler")
    # float32 rescaling cancels digits near the zero-SNR end; elsewhere the values agree to a few ulp
    rtol = 1e-4 if raw.get("rescale_betas_zero_snr") else 1e-6
    np.testing.assert_allclose(ours, sch.alphas_cumprod.numpy(), rtol=rtol, atol=1e-12)


CASES = [(s, raw, n) for s in SAMPLERS for raw in (SD1, SDXL) for n in (1, 7, 20)] + [
    (s, {**SDXL, "timestep_spacing": spacing}, 13) for s in SAMPLERS for spacing in ("trailing", "linspace")
] + [(s, ZERO_SNR, 9) for s in ("euler", "euler_a", "ddim", "ddpm", "dpmpp_2m", "unipc", "lcm")]


@pytest.mark.parametrize(("sampler", "raw", "num_steps"), CASES)
def test_schedule_matches_diffusers(sampler, raw, num_steps):
    if sampler == "lcm" and num_steps > 1 and raw is not SD1:
        num_steps = min(num_steps, 8)
    sch = diffusers_scheduler(sampler, raw, num_steps)
    ours = make_schedule(SchedulerConfig.from_dict(raw), sampler, num_steps)
    want = sch.timesteps.numpy().astype(np.float32)
    if sampler in ("dpm2", "dpmpp_sde"):  # log-midpoint timesteps: PyTorch's and numpy's float32 log differ by an ulp
        np.testing.assert_allclose(ours.loop_timesteps, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(ours.loop_timesteps, want)
    assert ours.num_steps == num_steps and ours.order == sch.order
    np.testing.assert_allclose(ours.init_noise_sigma, float(sch.init_noise_sigma), rtol=1e-6)
    if hasattr(sch, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, per_step_sigmas(sampler, sch, ours.num_steps), rtol=2e-6)


@pytest.mark.parametrize("kind", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if "karras" in SAMPLERS[s].sigma_schedules
                                     and s != "euler_a"])
@pytest.mark.parametrize("raw", [SD1, {**SDXL, "timestep_spacing": "trailing"}])
def test_sigma_schedules_match_diffusers(sampler, kind, raw):
    sch = diffusers_scheduler(sampler, raw, 11, kind)
    ours = make_schedule(SchedulerConfig.from_dict(raw), sampler, 11, kind)
    np.testing.assert_allclose(ours.loop_timesteps, sch.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours.sigmas, per_step_sigmas(sampler, sch, ours.num_steps), rtol=2e-6)
    # the config flag picks the same schedule
    flagged = SchedulerConfig.from_dict({**raw, **SIGMA_FLAGS[kind]})
    np.testing.assert_array_equal(make_schedule(flagged, sampler, 11).sigmas, ours.sigmas)


def test_lms_coefficients_match_diffusers():
    sch = diffusers_scheduler("lms", SDXL, 12)
    ours = make_schedule(SchedulerConfig.from_dict(SDXL), "lms", 12).extra["lms_coeffs"]
    for i in range(12):
        order = min(i + 1, 4)
        want = [sch.get_lms_coefficient(order, i, k) for k in range(order)]
        np.testing.assert_allclose(ours[i, :order], want, rtol=1e-5, atol=1e-7)
        assert not ours[i, order:].any()


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm2", "lms", "ddim", "ddpm", "pndm", "dpmpp_2m", "unipc"])
def test_add_noise_matches_diffusers(sampler):
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal((2, 4, 3, 5)).astype(np.float32) for _ in range(2))
    ours = make_schedule(SchedulerConfig.from_dict(SD1), sampler, 10)
    for step in (0, 4, 9):
        sch = diffusers_scheduler(sampler, SD1, 10)
        sch.set_begin_index(step * sch.order) if hasattr(sch, "set_begin_index") else None
        t = sch.timesteps[step * sch.order:][:1].repeat(2)
        if sampler == "pndm":  # whole steps sit on PNDM's plain timesteps (its list repeats t1)
            t = torch.tensor(sch._timesteps[::-1][step]).repeat(2)
        want = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        got = add_noise(ours, x0, noise, step)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(add_noise(ours, x0, noise, jnp.int32(step)), want, rtol=1e-6, atol=1e-6)


def test_img2img_start_step():
    for n in (1, 7, 10, 20, 50, 33):
        for strength in np.round(np.arange(0, 1.0001, 0.05), 2):
            want = max(n - min(int(n * float(strength)), n), 0)
            assert img2img_start_step(n, float(strength)) == want
            assert int(jax.jit(img2img_start_step, static_argnums=0)(n, strength)) == want, (n, strength)
    with pytest.raises(ValueError, match="strength"):
        img2img_start_step(10, 1.5)


def _xl_refiner_start(sch, fraction: float) -> int:
    pipe = types.SimpleNamespace(scheduler=sch)
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, len(sch.timesteps), 0.3, "cpu", fraction)
    return len(sch.timesteps) - len(timesteps)


def _xl_base_evals(sch, fraction: float) -> int:
    # StableDiffusionXLPipeline.__call__, "8.1 Apply denoising_end"
    cutoff = int(round(sch.config.num_train_timesteps - (fraction * sch.config.num_train_timesteps)))
    return len(list(filter(lambda ts: ts >= cutoff, sch.timesteps)))


@jax.jit
def _traced_start_end(schedule, fraction):
    return denoising_start_step(schedule, fraction), denoising_end_step(schedule, fraction)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "heun", "dpm2", "dpmpp_sde"])
def test_sdxl_denoising_start_and_end(sampler):
    for n in (10, 25, 40):
        sch = diffusers_scheduler(sampler, SDXL, n)
        ours = make_schedule(SchedulerConfig.from_dict(SDXL), sampler, n)
        for fraction in (0.05, 0.3, 0.5, 0.75, 0.8, 0.95):
            start = denoising_start_step(ours, fraction)
            end = denoising_end_step(ours, fraction)
            assert start == _xl_refiner_start(sch, fraction) // sch.order
            assert end == _xl_base_evals(sch, fraction) // sch.order
            if sch.order == 1:
                assert start == end  # the refiner picks up exactly where the base stopped
            traced = _traced_start_end(ours, fraction)
            assert tuple(int(v) for v in traced) == (start, end)
    with pytest.raises(ValueError, match="denoising_end"):
        denoising_end_step(ours, 1.0)


def test_bad_names_and_step_counts():
    cfg = SchedulerConfig.from_dict(SDXL)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*euler, euler_a"):
        make_schedule(cfg, "eulr", 10)
    with pytest.raises(ValueError, match="unknown sigma schedule 'karas'.*karras"):
        make_schedule(cfg, "euler", 10, "karas")
    with pytest.raises(ValueError, match="ddim.*karras"):
        make_schedule(cfg, "ddim", 10, "karras")
    with pytest.raises(ValueError, match="num_steps=0"):
        make_schedule(cfg, "euler", 0)
    with pytest.raises(ValueError, match="num_steps=1001"):
        make_schedule(cfg, "ddim", 1001)
