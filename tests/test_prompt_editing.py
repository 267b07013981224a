"""Prompt editing, alternation and AND through the pipeline, against references written from A1111's description.

The references run the sampling loop by hand in PyTorch (the tiny diffusers UNet, diffusers' Euler scheduler for
the sigmas): at A1111's sampler call i (counted from 0) each image's prompt and negative are the texts the user
would read off the brackets, encoded one by one with sdjax's checked text path (``pipe.encode_prompt``); AND parts
are combined on the denoised x0 exactly as A1111's ``CFGDenoiser.combine_denoised`` does."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from diffusers import EulerDiscreteScheduler

from sdjax import prompts as prompt_syntax
from sdjax.generation import core as generation_core
from sdjax.generation import host
from sdjax.generation.request import Request
from tests.conftest import assert_differ, assert_images_close
from tests.test_pipeline import CompileCounter

H, W, STEPS, SCALE = 32, 48, 4, 6.0
# Editing and alternation in the prompt, an AND with a weight (2 parts against 1: the second image's padded part
# has weight 0), a scheduled negative.
PROMPTS = ["a [red:blue:0.5] cat AND a dog:0.7", "a [dog|cat] on a hill:1.3"]
NEGATIVES = ["[blurry::2] photo", "ugly"]
WEIGHTS = [[1.0, 0.7], [1.3]]
# What A1111 conditions on at calls 0..3 of a 4-step run, read off the brackets by hand (per image, per AND part):
# [red:blue:0.5] -> "when" step 2: schedule [[2, red], [4, blue]], calls 0-2 are <= 2;
# [dog|cat] -> entries end at steps 1, 2, 3, 4 (dog, cat, dog, cat): call 0 and 1 -> dog, 2 -> cat, 3 -> dog;
# [blurry::2] -> "blurry photo" up to call 2, then " photo".
BY_HAND = [[["a red cat", " a dog"]] * 3 + [["a blue cat", " a dog"]],
           [["a dog on a hill"]] * 2 + [["a cat on a hill"], ["a dog on a hill"]]]
NEG_BY_HAND = [["blurry photo"] * 3 + [" photo"], ["ugly"] * 4]


def _noise(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, H // 8, W // 8)).astype(np.float32)


def _context(pipe, text: str) -> torch.Tensor:
    return torch.from_numpy(pipe.encode_prompt(text).prompt_embeds)


def _reference(sd1, noise: np.ndarray, conds, uncond, weights=None) -> np.ndarray:
    """Final latents of Euler (k-diffusion form, as A1111 samples) with the conditioning chosen per call by hand.
    ``conds[b][i]``: the contexts of image b's AND parts at call i; ``uncond[b][i]`` its negative's."""
    unet = sd1.torch_pipe.unet
    scheduler = EulerDiscreteScheduler.from_config(sd1.scheduler_config)
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.double()
    x = torch.from_numpy(noise).double() * float(scheduler.init_noise_sigma)  # diffusers' start, as sdjax's
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        denoised = []
        for b in range(noise.shape[0]):
            ctx = torch.cat([uncond[b][i], *conds[b][i]])
            x_in = (x[b:b + 1] / (sigma**2 + 1) ** 0.5).float().repeat(ctx.shape[0], 1, 1, 1)
            with torch.no_grad():
                eps = unet(x_in, t, encoder_hidden_states=ctx).sample.double()
            x0 = x[b:b + 1] - sigma * eps  # the denoised prediction of each conditioning
            # A1111's combine_denoised: uncond + sum_k (cond_k - uncond) * (weight_k * cond_scale)
            out = x0[:1].clone()
            for k in range(len(conds[b][i])):
                w = 1.0 if weights is None else weights[b][k]
                out += (x0[1 + k:2 + k] - x0[:1]) * (w * SCALE)
            denoised.append(out)
        d = (x - torch.cat(denoised)) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
    return x.float().numpy()


def _tol(latents: np.ndarray) -> float:
    """Final latents (std ~5 on the untrained tiny model) within 1e-4 of their scale: the effect of switching
    one step late is ~4x that."""
    return 1e-4 * float(latents.std())


def _generate(sd1, prompts, negatives=None, **kwargs) -> np.ndarray:
    return sd1.pipe.text_to_image(prompts, negative_prompt=negatives, sampler="euler", num_steps=STEPS,
                                  guidance_scale=SCALE, height=H, width=W, output="latent", **kwargs)


def test_editing_alternation_and_and_match_a_hand_switched_loop(tiny, fast_compile, monkeypatch) -> None:
    sd1 = tiny("sd1")
    pipe = sd1.pipe
    assert [prompt_syntax.step_prompts(p, STEPS) for p, _ in prompt_syntax.split_and(PROMPTS[0])] == [
        [row[k] for row in BY_HAND[0]] for k in range(2)]
    assert prompt_syntax.step_prompts(prompt_syntax.split_and(PROMPTS[1])[0][0], STEPS) == [
        row[0] for row in BY_HAND[1]]
    assert [prompt_syntax.step_prompts(p, STEPS) for p in NEGATIVES] == NEG_BY_HAND
    noise = _noise(2)
    compiles = CompileCounter(monkeypatch)
    latents = _generate(sd1, PROMPTS, NEGATIVES, latents=noise)
    assert compiles.take() == 1
    conds = [[[_context(pipe, text) for text in parts] for parts in row] for row in BY_HAND]
    unconds = [[_context(pipe, text) for text in row] for row in NEG_BY_HAND]
    reference = _reference(sd1, noise, conds, unconds, WEIGHTS)
    assert_images_close(latents, reference, "prompt editing, alternation and AND", tol=_tol(reference))
    # the check can tell the steps apart: switching one call late (A1111's counting off by one) is far off
    late = _reference(sd1, noise, [row[:1] + row[:-1] for row in conds], [row[:1] + row[:-1] for row in unconds],
                      WEIGHTS)
    err, err_late = (float(np.abs(latents - r).max()) for r in (reference, late))
    assert err_late > 10 * err, f"switching a call late differs by {err_late:.3g}, parity error {err:.3g}"

    # Moving `when`, other texts with as many distinct conditionings, other AND weights: numbers only, no compile.
    moved = _generate(sd1, ["a [red:blue:0.25] cat AND a dog", "a [cat|dog] on a hill AND x:0"],
                      ["[blurry::1] photo", "[ugly:3]"], latents=noise)
    assert compiles.take() == 0, "a new `when` or AND weight recompiled"
    assert_differ(moved, latents, "a new `when`", tol=1e-4)
    assert_differ(reference, _reference(sd1, noise, conds, unconds), "AND weights", tol=20 * err)


def test_sdxl_schedule_switches_context_and_pooled(tiny, fast_compile) -> None:
    """SDXL: each step's context and pooled embedding are those of the text active at that step (A1111 switches
    the whole conditioning, its "vector" included), for the prompt and the negative; a plain prompt keeps one."""
    sdxl = tiny("sdxl")
    pipe = sdxl.pipe
    request = Request.build("text", ["a [red:blue:1] cat", "a plain dog"], negative_prompt=["[ugly|bad]", "blurry"],
                            num_steps=3, guidance_scale=5.0)
    prepared = host.prepare(pipe, request)
    steps = prepared.inputs.prompt_steps
    assert set(steps) == {"cond", "uncond"} and steps["cond"].shape == (2, 3)
    model = generation_core.Model.of(pipe)
    encode = jax.jit(functools.partial(generation_core._encode_passes, model, prepared.plan))
    encoded = encode({name: pipe.params[name] for name in pipe.text_encoders}, prepared.inputs)
    expected = {"cond": [["a red cat"] * 2 + ["a blue cat"], ["a plain dog"] * 3],
                "uncond": [["ugly", "ugly", "bad"], ["blurry"] * 3]}
    for i in range(3):
        at = generation_core._at_step(encoded, steps, i)
        for name, rows in expected.items():
            ref = pipe.encode_prompt([row[i] for row in rows])
            np.testing.assert_allclose(np.asarray(at[name][0]), ref.prompt_embeds, atol=1e-5)
            np.testing.assert_allclose(np.asarray(at[name][1]), ref.pooled_prompt_embeds, atol=1e-5)


def test_composable_wraps_any_method_as_a1111_combines() -> None:
    """guidance.Composable on made-up predictions: CFG gives A1111's combine_denoised; a method that asks for the
    conditional pass alone (Interval outside its range, Conditional) gets the combined prediction."""
    import jax.numpy as jnp

    from sdjax import guidance
    from sdjax.guidance import COND, UNCOND, StepContext

    rng = np.random.default_rng(0)
    preds = {name: jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
             for name in (UNCOND, COND, "cond_1", "cond_2")}
    weights = np.array([[1.0, 0.7, -0.4], [1.3, 0.0, 0.0]], np.float32)

    def run(passes, x=None):
        return {p: preds[p] for p in passes}

    ctx = StepContext(x=preds[UNCOND], alpha=jnp.float32(0.8), sigma_t=jnp.float32(0.6), t=jnp.float32(500.0),
                      step=jnp.int32(0), num_steps=4, prediction_type="epsilon", num_train_timesteps=1000)
    u = np.asarray(preds[UNCOND])
    expected = u.copy()
    for b in range(2):
        for k, name in enumerate((COND, "cond_1", "cond_2")):
            expected[b] += (np.asarray(preds[name][b]) - u[b]) * (weights[b, k] * 6.0)
    methods = (guidance.Composable(guidance.CFG(6.0), weights),
               guidance.Composable(guidance.Interval(guidance.CFG(6.0), sigma_max=0.1), weights),
               guidance.Composable(guidance.Conditional(), weights))
    assert set(methods[0].passes()) == {UNCOND, COND, "cond_1", "cond_2"} and UNCOND in methods[2].passes()
    # one compile for the three (op by op they take seconds)
    cfg, outside, alone = jax.jit(lambda: [m.evaluate(run, ctx, ())[0].out for m in methods])()
    np.testing.assert_allclose(np.asarray(cfg), expected, rtol=1e-5, atol=1e-5)
    combined = (expected - u) / 6.0 + u
    np.testing.assert_allclose(np.asarray(outside), combined, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(alone), combined, rtol=1e-5, atol=1e-5)
