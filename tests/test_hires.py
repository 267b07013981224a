"""Hires fix (A1111's): latent upscalers against torch's interpolate, A1111's hires-step rule, latents given as
the image noised as diffusers noises them, and the one call equal to its three parts done by hand."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import hires
from sdjax.samplers import img2img_start_step
from tests.conftest import GUIDANCE, HEIGHT, PROMPTS, WIDTH, FixedNoise, assert_differ, assert_images_close, noise

IMG2IMG_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"


@pytest.mark.parametrize("name", list(hires.LATENT_UPSCALERS))
def test_latent_upscalers_match_torch_interpolate(name) -> None:
    mode, antialias = hires.LATENT_UPSCALERS[name]
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 7)).astype(np.float32)
    for size in ((10, 14), (8, 11), (5, 7), (13, 9)):  # x2, non-integer, same size, one axis down
        ours = hires.upscale_latents(x, size, name)
        kwargs = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": antialias}
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode, **kwargs).numpy()
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"{name} to {size}")


def test_upscaler_names() -> None:
    assert hires.resolve_upscaler("latent") == "Latent"
    assert hires.resolve_upscaler("LATENT (BICUBIC)") == "Latent (bicubic)"
    assert hires.resolve_upscaler("latent-nearest-exact") == "Latent (nearest-exact)"
    assert hires.resolve_upscaler("lanczos") == "Lanczos"
    with pytest.raises(ValueError, match="hires_upscaler 'ESRGAN_4x' is unknown"):
        hires.resolve_upscaler("ESRGAN_4x")


def test_hires_steps_follow_a1111() -> None:
    """A1111's setup_img2img_steps with explicit steps: a schedule of int(N / min(s, 0.999)) steps whose last N
    run; sdjax's traced strength N / T starts exactly there."""
    start = jax.jit(img2img_start_step, static_argnums=0)
    for steps in (1, 2, 3, 7, 20, 30, 50):
        for strength in (0.05, 0.1, 0.3, 0.35, 0.5, 0.7, 0.75, 0.9, 0.999, 1.0):
            total, s = hires.hires_schedule(steps, strength)
            assert total == int(steps / min(strength, 0.999))
            assert total - int(start(total, jnp.float32(s))) == steps, (steps, strength, total)
    assert hires.hires_schedule(20, 0.5) == (40, 0.5)
    assert hires.target_size(64, 96, 1.5) == (96, 144) and hires.target_size(64, 64, 1.3) == (80, 80)


def test_latents_as_image_are_noised_as_diffusers(tiny, monkeypatch, fast_compile) -> None:
    """StableDiffusionImg2ImgPipeline given latents as ``image`` noises them to the start step (no
    denoising_start): sdjax does the same."""
    sd1 = tiny("sd1")
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(sd1.torch_pipe)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(sd1.scheduler_config)
    latents = np.random.default_rng(11).standard_normal((2, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    added = noise(seed=12)
    fixed = FixedNoise(added)
    monkeypatch.setattr(f"{IMG2IMG_MODULE}.randn_tensor", fixed)
    with torch.no_grad():
        expected = ref_pipe(PROMPTS, image=torch.from_numpy(latents), strength=0.6, num_inference_steps=5,
                            guidance_scale=GUIDANCE, output_type="np").images
    assert fixed.calls == 1
    actual = sd1.pipe.image_to_image(PROMPTS, latents, strength=0.6, sampler="euler", num_steps=5,
                                     guidance_scale=GUIDANCE, latents=added)
    assert_images_close(actual, expected, "latents as image, strength 0.6")


@pytest.mark.parametrize("upscaler", ["Latent (bicubic)", "Lanczos"])
def test_hires_call_equals_its_parts(tiny, fast_compile, upscaler) -> None:
    """text_to_image(hires_scale=...) = text_to_image, the upscale, image_to_image by hand (A1111's steps)."""
    pipe = tiny("sd1").pipe
    common = dict(negative_prompt="blurry", guidance_scale=GUIDANCE, sampler="euler", seed=7)
    steps, strength, scale = 3, 0.5, 1.5
    got = pipe.text_to_image(PROMPTS, num_steps=steps, height=HEIGHT, width=WIDTH, hires_scale=scale,
                             hires_strength=strength, hires_upscaler=upscaler, **common)
    size = (int(HEIGHT * scale), int(WIDTH * scale))
    assert got.shape == (2, *size, 3)

    if upscaler.startswith("Latent"):
        base = pipe.text_to_image(PROMPTS, num_steps=steps, height=HEIGHT, width=WIDTH, output="latent", **common)
        image = hires.upscale_latents(base, (size[0] // 8, size[1] // 8), upscaler)
    else:
        base = pipe.text_to_image(PROMPTS, num_steps=steps, height=HEIGHT, width=WIDTH, **common)
        image = hires.upscale_pixels(base, size, upscaler)
    total, run_strength = hires.hires_schedule(steps, strength)
    assert total == 6
    expected = pipe.image_to_image(PROMPTS, image, strength=run_strength, num_steps=total, **common)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert float(got.std()) > 1e-2
    if upscaler.startswith("Latent"):  # the hires pass re-drew the upscaled latents
        assert_differ(got, _decode(pipe, image), "the hires pass")


def _decode(pipe, latents: np.ndarray) -> np.ndarray:
    from sdjax.generation.host import decode

    return decode(pipe, np.ascontiguousarray(latents.transpose(0, 2, 3, 1)), "np")


def test_hires_errors_before_any_work(tiny, monkeypatch) -> None:
    import sdjax.generation

    pipe = tiny("sd1").pipe

    def no_run(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(sdjax.generation, "run", no_run)
    call = dict(num_steps=2, height=HEIGHT, width=WIDTH)
    cases = [
        (dict(hires_strength=0.5), "need hires_scale"),
        (dict(hires_scale=0.5), "hires_scale must be a number >= 1"),
        (dict(hires_scale=2, hires_strength=0.0), r"hires_strength must be in \(0, 1\]"),
        (dict(hires_scale=2, hires_steps=-1), "hires_steps must be a non-negative integer"),
        (dict(hires_scale=2, hires_upscaler="R-ESRGAN"), "hires_upscaler 'R-ESRGAN' is unknown"),
        (dict(hires_scale=2, hires_strength=0.001), "more than the model's 1000"),
        (dict(hires_scale=2, guidance_scale=[2.0, 5.0]), "guidance sweep"),
        (dict(hires_scale=2, denoising_end=0.5), "denoising_end"),
        (dict(hires_scale=2, sampler="nope"), "nope"),
        (dict(hires_scale=2, clip_skip=-1), "clip_skip"),
        (dict(hires_scale=1e5), "height"),  # more memory than there is
    ]
    for options, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            pipe.text_to_image(PROMPTS, **{**call, **options})


def test_hires_pass_schedules_prompts_as_a1111(tiny, monkeypatch) -> None:
    """The second pass's prompt editing counts on from the first pass (A1111's calculate_hr_conds): with 20
    base steps, ``[cat:dog:0.5]`` is "dog" for the whole hires pass, ``[cat:dog:25]`` switches at its step 5."""
    import sdjax.generation
    from sdjax.generation import host
    from sdjax.prompts import prompt_schedule, step_prompts

    pipe = tiny("sd1").pipe
    requests = []

    def fake_run(p, request, **_):  # records the requests; the first pass's "latents" are noise
        requests.append(request)
        return noise(len(request.prompts))

    monkeypatch.setattr(sdjax.generation, "run", fake_run)
    prompts = ["a [cat:dog:0.5]", "a [cat:dog:25] [x|y]"]
    pipe.text_to_image(prompts, num_steps=20, height=HEIGHT, width=WIDTH, hires_scale=1.5, hires_strength=0.7,
                       hires_steps=12, negative_prompt=["[ugly::0.5]", "blurry"])
    first, second = requests
    assert second.hires_prompt_steps == (20, 12) and first.hires_prompt_steps is None
    prepared = host.prepare(pipe, second)
    start = img2img_start_step(second.num_steps, second.strength)
    assert second.num_steps - start == 12
    table = prepared.inputs.prompt_steps["cond"]
    for b, prompt in enumerate(prompts):
        texts = step_prompts(prompt, 20, 12)
        distinct = list(dict.fromkeys(texts))
        np.testing.assert_array_equal(table[b][:12], [distinct.index(t) for t in texts])
    assert step_prompts(prompts[0], 20, 12) == ["a dog"] * 12  # over plain 28 steps it would start as "a cat"
    second_texts = step_prompts(prompts[1], 20, 12)
    assert second_texts[0] == "a cat x" and second_texts[-1].startswith("a dog")
    assert prompt_schedule(prompts[1], 20, 12) != prompt_schedule(prompts[1], second.num_steps)
