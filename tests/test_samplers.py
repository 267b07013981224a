"""Samplers against diffusers' scheduler loops, with a cheap nonlinear fake model used on both sides.

The reference runs exactly as StableDiffusionPipeline does: ``latents = noise * init_noise_sigma``; for each
timestep, ``scale_model_input``, model, ``step``. Stochastic samplers get sdjax's noise injected into
diffusers (``variance_noise=`` or a patched ``randn_tensor``), so their arithmetic is compared exactly too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm

from sdjax.samplers import (
    SAMPLER_INFO,
    SAMPLERS,
    SchedulerConfig,
    add_noise,
    img2img_start_step,
    inpaint_post_step,
    make_schedule,
    sample,
)
from tests.test_schedules import DIFFUSERS, SD1, SD2, SDXL, SIGMA_FLAGS, ZERO_SNR

SHAPE = (2, 5, 7, 4)  # NHWC on the sdjax side, NCHW for diffusers


def torch_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.7 * x + 0.001 * t.float()) * 0.9 + 0.05 * x  # the UNet casts t to float32


def jax_model(x: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.tanh(0.7 * x + 0.001 * t) * 0.9 + 0.05 * x


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@jax.jit
@functools.partial(jax.vmap, in_axes=(0, None, None))
def _documented_noise(key: jax.Array, step: int, draw: int) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, step), draw), SHAPE[1:], jnp.float32)


def step_noise(keys: jax.Array, step: int, draw: int) -> np.ndarray:
    """The documented per-image noise: normal(fold_in(fold_in(key_b, step), draw)), written out here."""
    return np.asarray(_documented_noise(keys, step, draw))


def reference(sampler, raw, num_steps, noise, *, kind="default", start=0, init=None, mask=None, keys=None,
              eta=None, monkeypatch=None):
    """diffusers' pipeline loop; ``start`` > 0 is image-to-image, ``mask`` the 4-channel inpainting blend."""
    cls, kwargs = DIFFUSERS[sampler]
    sch = cls.from_config(raw, **kwargs, **SIGMA_FLAGS[kind])
    sch.set_timesteps(num_steps)
    timesteps = sch.timesteps[start * sch.order:]
    noise_t = nchw(noise)
    if start:
        if hasattr(sch, "set_begin_index"):  # as the img2img pipelines do (DDIM/PNDM/DDPM have none)
            sch.set_begin_index(start * sch.order)
        latents = sch.add_noise(nchw(init), noise_t, timesteps[:1].repeat(SHAPE[0]))
    else:
        latents = noise_t * sch.init_noise_sigma
    step_kwargs, draws = _inject_noise(sampler, sch, keys, eta, start, monkeypatch)
    for k, t in enumerate(timesteps):
        out = torch_model(sch.scale_model_input(latents, t), t)
        latents = sch.step(out, t, latents, **step_kwargs(start + k // sch.order)).prev_sample
        if mask is not None:
            known = nchw(init)
            if k < len(timesteps) - 1:
                known = sch.add_noise(known, noise_t, timesteps[k + 1:k + 2])
            latents = (1 - nchw(mask)) * known + nchw(mask) * latents
    return latents.numpy().transpose(0, 2, 3, 1)


def _inject_noise(sampler, sch, keys, eta, start, monkeypatch):
    """Make diffusers draw sdjax's per-step noise; returns (kwargs for step(i), call counter)."""
    calls = {"n": 0}

    def noise(step: int, draw: int = 0) -> torch.Tensor:
        return nchw(step_noise(keys, step, draw))

    if sampler == "ddim" and eta is not None:
        return (lambda i: {"eta": eta, "variance_noise": noise(i)}), calls
    if sampler == "dpmpp_2m_sde":
        return (lambda i: {"variance_noise": noise(i)}), calls
    module = {"euler_a": scheduling_euler_ancestral_discrete, "ddpm": scheduling_ddpm, "lcm": scheduling_lcm}
    if sampler in module:
        def fake_randn(*args, **kwargs):
            calls["n"] += 1
            return noise(start + calls["n"] - 1)

        monkeypatch.setattr(module[sampler], "randn_tensor", fake_randn)
    if sampler == "dpmpp_sde":
        def brownian(sigma, sigma_to):
            i, stage = divmod(calls["n"], 2)
            calls["n"] += 1
            z1 = noise(start + i, 0)
            if stage == 0:
                calls["d1"] = float(sigma - sigma_to)
                return z1
            d1, d2 = calls["d1"], float(sigma - sigma_to)
            return (d1**0.5 * z1 + (d2 - d1) ** 0.5 * noise(start + i, 1)) / d2**0.5

        sch.noise_sampler = brownian
    return (lambda i: {}), calls


_jit_sample = jax.jit(sample, static_argnames=("model_fn", "post_step"))


def run(schedule, x, *, model=jax_model, keys=None, eta=None, start=0, end=None, post=None) -> np.ndarray:
    """sdjax's loop, jitted, always called the same way: one compile per sampler, prediction type, step count
    and argument structure (start/end steps, eta and keys are traced)."""
    end = schedule.num_steps if end is None else end
    return np.asarray(_jit_sample(model, x, schedule, keys=keys, eta=eta, start_step=start, end_step=end,
                                  post_step=post))


def ours(sampler, raw, num_steps, noise, *, kind="default", start=0, init=None, mask=None, keys=None, eta=None):
    schedule = make_schedule(SchedulerConfig.from_dict(raw), sampler, num_steps, kind)
    x = add_noise(schedule, init, noise, start) if start else noise * schedule.init_noise_sigma
    post = inpaint_post_step(schedule, init, noise, mask) if mask is not None else None
    return run(schedule, x, keys=keys, eta=eta, start=start, post=post)


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"max abs difference {err:.2e} of the output's scale"


def randn(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


DETERMINISTIC = [("ddim", "default"), ("pndm", "default"), ("lms", "default"), ("euler", "default"),
                 ("heun", "default"), ("dpm2", "default"), ("dpmpp_2m", "default"), ("dpmpp_2m", "karras"),
                 ("dpmpp_2m", "exponential"), ("unipc", "default")]
V_PRED = {**SD1, "prediction_type": "v_prediction"}
# Step counts are shared on purpose: schedules with the same sampler, prediction type and step count share
# one compiled loop (their arrays are traced), which keeps this file fast.
CONFIGS = {"sd1-7": (SD1, 7), "sdxl-7": (SDXL, 7), "sd1-v-20": (V_PRED, 20)}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("sampler", "kind"), DETERMINISTIC)
def test_deterministic_parity(sampler, kind, config):
    raw, n = CONFIGS[config]
    noise = randn(n)
    assert_close(ours(sampler, raw, n, noise, kind=kind), reference(sampler, raw, n, noise, kind=kind))


@pytest.mark.parametrize(("sampler", "kind"), DETERMINISTIC)
def test_spacing_parity(sampler, kind):
    """Each sampler on "trailing" or "linspace" spacing (alternating), and SD 2.1's v-prediction config."""
    spacing = "trailing" if DETERMINISTIC.index((sampler, kind)) % 2 else "linspace"
    raw, noise = {**SDXL, "timestep_spacing": spacing, "prediction_type": "v_prediction"}, randn(2)
    assert_close(ours(sampler, raw, 20, noise, kind=kind), reference(sampler, raw, 20, noise, kind=kind))


def test_sd2_config_parity():
    noise = randn(1)
    assert_close(ours("ddim", SD2, 20, noise), reference("ddim", SD2, 20, noise))


@pytest.mark.parametrize(("sampler", "kind"), [
    ("euler", "karras"), ("heun", "karras"), ("dpm2", "karras"), ("lms", "exponential"), ("unipc", "karras"),
])
def test_sigma_schedule_parity(sampler, kind):
    noise = randn(3)
    assert_close(ours(sampler, SDXL, 7, noise, kind=kind), reference(sampler, SDXL, 7, noise, kind=kind))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "unipc"])
def test_zero_terminal_snr_parity(sampler):
    noise = randn(4)
    assert_close(ours(sampler, ZERO_SNR, 20, noise), reference(sampler, ZERO_SNR, 20, noise))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "unipc"])
def test_sample_prediction_parity(sampler):
    raw, noise = {**SDXL, "prediction_type": "sample"}, randn(5)
    assert_close(ours(sampler, raw, 7, noise), reference(sampler, raw, 7, noise))


@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "ddim", "dpmpp_2m", "unipc"])
def test_img2img_parity(sampler):
    noise, init = randn(6), randn(7) * 0.5
    start = img2img_start_step(7, 0.65)
    assert start == 3
    got = ours(sampler, SD1, 7, noise, start=start, init=init)
    assert_close(got, reference(sampler, SD1, 7, noise, start=start, init=init))


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_masked_post_step_parity(sampler):
    noise, init = randn(8), randn(9) * 0.5
    mask = (np.random.default_rng(10).random((*SHAPE[:3], 1)) > 0.5).astype(np.float32)
    got = ours(sampler, SD1, 8, noise, init=init, mask=mask)
    assert_close(got, reference(sampler, SD1, 8, noise, init=init, mask=mask))
    np.testing.assert_allclose(got[..., :][mask[..., 0] == 0], init[mask[..., 0] == 0], atol=1e-6)


STOCHASTIC = [("euler_a", None), ("ddpm", None), ("lcm", None), ("dpmpp_2m_sde", None), ("dpmpp_sde", None),
              ("ddim", 1.0), ("ddim", 0.4)]


@pytest.mark.parametrize(("sampler", "eta"), STOCHASTIC)
def test_stochastic_parity_with_injected_noise(sampler, eta, monkeypatch):
    keys = jax.random.split(jax.random.key(11), SHAPE[0])
    noise = randn(12)
    raw = SD1 if sampler == "lcm" else V_PRED
    got = ours(sampler, raw, 6, noise, keys=keys, eta=eta)
    want = reference(sampler, raw, 6, noise, keys=keys, eta=eta, monkeypatch=monkeypatch)
    assert_close(got, want)


@pytest.mark.parametrize(("sampler", "eta"), [("dpmpp_sde", None), ("ddim", 0.7)])
def test_stochastic_keys_and_batch_independence(sampler, eta):
    schedule = make_schedule(SchedulerConfig.from_dict(V_PRED), sampler, 6)
    noise = randn(13) * schedule.init_noise_sigma
    keys = jax.random.split(jax.random.key(14), 2)
    go = functools.partial(run, schedule, eta=eta)
    full = go(noise, keys=keys)
    np.testing.assert_array_equal(full, go(noise, keys=keys))  # same keys, same images
    other = go(noise, keys=jax.random.split(jax.random.key(15), 2))
    assert (np.abs(other - full).max(axis=(1, 2, 3)) > 1e-3).all()  # every image changes with its key
    alone = go(noise[1:2], keys=keys[1:2])  # image 1 sampled by itself
    np.testing.assert_allclose(alone[0], full[1], rtol=1e-6, atol=1e-6)
    if sampler == "ddim":
        raw_keys = jax.random.key_data(keys)  # (B, 2) uint32 keys are the same keys
        np.testing.assert_allclose(go(noise, keys=raw_keys), full, rtol=1e-6, atol=1e-6)


def _injected_std(sampler: str, schedule, i: int, eta: float) -> float:
    """Std of the fresh noise one step adds, from the schedule, by the samplers' published formulas."""
    sig = schedule.sigmas.astype(np.float64)
    s, sn = sig[i], sig[i + 1]
    ex = {k: v.astype(np.float64) for k, v in schedule.extra.items()}
    if sampler in ("euler_a", "dpmpp_sde"):
        return min(sn, eta * (sn**2 * (s**2 - sn**2) / s**2) ** 0.5)
    if sampler in ("ddim", "ddpm"):
        a, ap = ex["alphas"][i], ex["alphas_prev"][i]
        return eta * ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
    if sampler == "lcm":
        return (1 - ex["alphas_prev"][i]) ** 0.5
    alpha_t, alpha_s = 1 / (1 + sn**2) ** 0.5, 1 / (1 + s**2) ** 0.5  # dpmpp_2m_sde
    h = np.log(alpha_t / (sn * alpha_t)) - np.log(alpha_s / (s * alpha_s))
    return sn * alpha_t * (1 - np.exp(-2 * eta * h)) ** 0.5


def const_model(x: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.full_like(x, 0.3)


@pytest.mark.parametrize(("sampler", "eta"), [
    ("euler_a", 1.0), ("euler_a", 0.5), ("dpmpp_2m_sde", 1.0), ("dpmpp_2m_sde", 0.6), ("dpmpp_sde", 1.0),
    ("dpmpp_sde", 0.5), ("ddim", 1.0), ("ddim", 0.4),
])
def test_injected_noise_statistics(sampler, eta):
    """With a model whose x0 is a known constant, a step's fresh noise has mean 0 and the sampler's std, and
    the latent keeps the forward process's marginal (signal * c, noise_scale) step after step.

    Covers what diffusers cannot check: eta other than 1, and DPM++ SDE's own Brownian increments (DDPM and
    LCM have no free parameter and are compared exactly above, with injected noise)."""
    raw = {**SD1, "prediction_type": "sample"}
    schedule = make_schedule(SchedulerConfig.from_dict(raw), sampler, 10)
    c, shape = 0.3, (2, 64, 64, 4)
    start = 3
    x = add_noise(schedule, jnp.full(shape, c), randn(16, shape), start)
    go = functools.partial(run, schedule, x, model=const_model, eta=eta, start=start)
    one_a = go(keys=jax.random.split(jax.random.key(17), 2), end=start + 1)
    one_b = go(keys=jax.random.split(jax.random.key(18), 2), end=start + 1)
    diff = (one_a - one_b) / 2**0.5
    expected = _injected_std(sampler, schedule, start, 1.0 if eta is None else eta)
    assert abs(diff.mean()) < 0.02 * expected
    assert diff.std() == pytest.approx(expected, rel=0.03)

    end = start + 4
    x_end = go(keys=jax.random.split(jax.random.key(19), 2), end=end)
    residual = x_end - schedule.signal_scale[end] * c
    assert abs(residual.mean()) < 0.02 * schedule.noise_scale[end]
    assert residual.std() == pytest.approx(schedule.noise_scale[end], rel=0.03)


def test_jit_does_not_recompile_for_traced_arguments():
    traces = {"n": 0}
    schedule = make_schedule(SchedulerConfig.from_dict(SDXL), "dpmpp_2m_sde", 8)

    @jax.jit
    def generate(x, schedule, keys, eta, start, strength):
        traces["n"] += 1
        start = jnp.maximum(start, img2img_start_step(schedule.num_steps, strength))
        return sample(jax_model, x, schedule, keys=keys, eta=eta, start_step=start)

    noise = jnp.asarray(randn(20))
    outs = [generate(noise, schedule, jax.random.split(jax.random.key(seed), 2), eta, start, strength)
            for seed, eta, start, strength in [(0, 1.0, 0, 1.0), (1, 0.5, 2, 1.0), (2, 0.0, 0, 0.5)]]
    assert traces["n"] == 1
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
    # eta = 0 makes DPM++ 2M SDE the deterministic DPM++ 2M
    det = make_schedule(SchedulerConfig.from_dict(SDXL), "dpmpp_2m", 8)
    np.testing.assert_allclose(outs[2], sample(jax_model, noise, det, start_step=4), rtol=1e-5, atol=1e-5)


def test_errors():
    schedule = make_schedule(SchedulerConfig.from_dict(SD1), "euler_a", 4)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="euler_a.*keys"):
        sample(jax_model, x, schedule)
    with pytest.raises(ValueError, match=r"one key per image.*\(2,\)"):
        sample(jax_model, x, schedule, keys=jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="ddim.*keys"):
        sample(jax_model, x, make_schedule(SchedulerConfig.from_dict(SD1), "ddim", 4), eta=0.5)


def test_sampler_table():
    assert set(SAMPLER_INFO) == set(SAMPLERS) == {
        "ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpm2", "dpmpp_2m", "dpmpp_2m_sde",
        "dpmpp_sde", "unipc", "lcm"}
    assert SAMPLER_INFO["pndm"]["a1111"] == "PLMS" and SAMPLER_INFO["ddpm"]["a1111"] is None
    assert "sde-dpmsolver++" in SAMPLER_INFO["dpmpp_2m_sde"]["diffusers"]


X0_PROCESSING = {
    "clip": {**SD1, "clip_sample": True, "clip_sample_range": 0.8},
    "clip-omitted": {k: v for k, v in SD1.items() if k != "clip_sample"},  # DDIM/DDPM's class default: clip at 1
    "threshold": {**SD1, "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
}


@pytest.mark.parametrize("config", X0_PROCESSING)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_x0_clipping_and_thresholding_parity(sampler, config, monkeypatch):
    """diffusers' DDIM/DDPM clip_sample / Imagen dynamic thresholding, including configs that omit clip_sample."""
    raw = X0_PROCESSING[config]
    noise = randn(21) * 2.0  # large latents: x0 estimates leave [-1, 1], so the processing matters
    keys = jax.random.split(jax.random.key(22), SHAPE[0]) if sampler == "ddpm" else None
    got = ours(sampler, raw, 6, noise, keys=keys)
    want = reference(sampler, raw, 6, noise, keys=keys, monkeypatch=monkeypatch)
    assert_close(got, want)
    plain = ours(sampler, {**SD1, "clip_sample": False}, 6, noise, keys=keys)
    assert np.abs(got - plain).max() > 1e-2, "the x0 processing had no effect on this input"
