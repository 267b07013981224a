"""SDXL end-to-end parity against diffusers on tiny models: text-to-image (empty-prompt zeros, negative prompts,
second prompts, guidance rescale, CLIP skip, micro-conditioning), image-to-image, and the base -> refiner
ensemble of experts (denoising_end / denoising_start, aesthetic score)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from tests.conftest import (
    GUIDANCE,
    HEIGHT,
    NEGATIVES,
    PROMPTS,
    STEPS,
    WIDTH,
    FixedNoise,
    assert_differ,
    assert_images_close,
    input_images,
    noise,
    set_scheduler,
)

pytestmark = pytest.mark.usefixtures("fast_compile")

EULER = ("euler", None, EulerDiscreteScheduler, {})
DPMPP_2M_KARRAS = ("dpmpp_2m", "karras", DPMSolverMultistepScheduler,
                   {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})
PROMPTS_2 = ["oil on canvas, dramatic light", "a pencil sketch"]
NEGATIVES_2 = ["jpeg artifacts", "oversaturated"]
IMG2IMG_MODULE = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img"


def reference(tiny, sampler, prompts=PROMPTS, steps=STEPS, latents=None, **kwargs):
    _, _, cls, overrides = sampler
    set_scheduler(tiny, cls, **overrides)
    kwargs.setdefault("output_type", "np")
    latents = noise() if latents is None else latents
    with torch.no_grad():
        return tiny.torch_pipe(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                               guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), **kwargs).images


def generate(tiny, sampler, prompts=PROMPTS, steps=STEPS, **kwargs):
    name, schedule = sampler[:2]
    return tiny.pipe.text_to_image(prompts, sampler=name, schedule=schedule, num_steps=steps,
                                   guidance_scale=GUIDANCE, latents=noise(), height=HEIGHT, width=WIDTH, **kwargs)


def sdxl_embeds(torch_pipe, prompts, clip_skip: int):
    """SDXL prompt embeddings by hand: the hidden state ``clip_skip + 2`` from the end (un-normed) of both
    encoders, concatenated, and text_encoder_2's projected pooled output."""
    contexts = []
    with torch.no_grad():
        for tokenizer, encoder in ((torch_pipe.tokenizer, torch_pipe.text_encoder),
                                   (torch_pipe.tokenizer_2, torch_pipe.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            contexts.append(out.hidden_states[-(clip_skip + 2)])
    return torch.cat(contexts, dim=-1), out.text_embeds


def test_text_to_image_empty_negative_is_zeros(tiny) -> None:
    # force_zeros_for_empty_prompt: without a negative prompt the unconditional embeddings are zeros.
    sdxl = tiny("sdxl")
    assert sdxl.pipe.force_zeros_for_empty_prompt
    assert_images_close(generate(sdxl, EULER), reference(sdxl, EULER), "SDXL euler, no negative prompt")


def test_text_to_image_options(tiny) -> None:
    sdxl = tiny("sdxl")
    negative = dict(negative_prompt=NEGATIVES)
    plain = generate(sdxl, EULER, **negative)
    assert_images_close(plain, reference(sdxl, EULER, **negative), "SDXL euler, negative prompt")

    both = dict(negative, prompt_2=PROMPTS_2, negative_prompt_2=NEGATIVES_2)
    second = generate(sdxl, EULER, **both)
    assert_images_close(second, reference(sdxl, EULER, **both), "SDXL prompt_2 / negative_prompt_2")
    assert_differ(second, plain, "prompt_2")

    strong = dict(negative, guidance_scale=4 * GUIDANCE)
    rescaled = sdxl.pipe.text_to_image(PROMPTS, sampler="euler", num_steps=STEPS, latents=noise(), height=HEIGHT,
                                       width=WIDTH, guidance_rescale=0.7, **strong)
    set_scheduler(sdxl, EulerDiscreteScheduler)
    with torch.no_grad():
        expected = sdxl.torch_pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                                   latents=torch.from_numpy(noise()), output_type="np", guidance_rescale=0.7,
                                   **strong).images
    assert_images_close(rescaled, expected, "SDXL guidance_rescale=0.7")

    # Micro-conditioning: size and crop of the (pretend) training image, for both halves of the guidance.
    micro = dict(negative, original_size=(128, 160), crops_coords_top_left=(16, 8), target_size=(96, 112))
    conditioned = generate(sdxl, EULER, **micro)
    assert_images_close(conditioned, reference(sdxl, EULER, **micro), "SDXL micro-conditioning")
    assert_differ(conditioned, plain, "micro-conditioning")
    micro_negative = dict(micro, negative_original_size=(512, 512), negative_crops_coords_top_left=(0, 32),
                          negative_target_size=(1024, 1024))
    conditioned_negative = generate(sdxl, EULER, **micro_negative)
    # StableDiffusionXLPipeline concatenates [negative, positive] time ids and *then* repeats them per image,
    # which pairs them with the wrong halves of a batch of more than one whenever the two differ
    # ([n, p, n, p] against embeddings [n0, n1, p0, p1]); so the reference makes one image at a time.
    expected = np.concatenate([
        reference(sdxl, EULER, prompts=PROMPTS[i:i + 1], latents=noise()[i:i + 1],
                  **dict(micro_negative, negative_prompt=NEGATIVES[i:i + 1]))
        for i in range(2)])
    assert_images_close(conditioned_negative, expected, "SDXL negative micro-conditioning")
    assert_differ(conditioned_negative, conditioned, "negative micro-conditioning")


def test_text_to_image_dpmpp_2m_karras(tiny) -> None:
    sdxl = tiny("sdxl")
    negative = dict(negative_prompt=NEGATIVES)
    assert_images_close(generate(sdxl, DPMPP_2M_KARRAS, **negative), reference(sdxl, DPMPP_2M_KARRAS, **negative),
                        "SDXL dpmpp_2m karras")


def test_clip_skip(tiny) -> None:
    sdxl = tiny("sdxl")
    # The hand-made reference agrees with diffusers' own encoding where that works (no CLIP skip).
    embeds, pooled = sdxl_embeds(sdxl.torch_pipe, PROMPTS, 0)
    with torch.no_grad():
        own, _, own_pooled, _ = sdxl.torch_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, own)
    torch.testing.assert_close(pooled, own_pooled)

    clip_skip = 1  # the tiny encoders have 3 layers
    embeds, pooled = sdxl_embeds(sdxl.torch_pipe, PROMPTS, clip_skip)
    negative_embeds, negative_pooled = sdxl_embeds(sdxl.torch_pipe, NEGATIVES, clip_skip)
    expected = reference(sdxl, EULER, prompts=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                         negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
    actual = generate(sdxl, EULER, negative_prompt=NEGATIVES, clip_skip=clip_skip)
    assert_images_close(actual, expected, f"SDXL clip_skip={clip_skip}")
    assert_differ(actual, generate(sdxl, EULER, negative_prompt=NEGATIVES), "clip_skip")


def test_image_to_image(tiny, monkeypatch) -> None:
    sdxl = tiny("sdxl")
    ref_pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl.torch_pipe)
    ref_pipe.set_progress_bar_config(disable=True)
    set_scheduler(sdxl, EulerDiscreteScheduler, ref_pipe)
    images, added = input_images(seed=2), noise(seed=7)
    fixed = FixedNoise(added)
    monkeypatch.setattr(f"{IMG2IMG_MODULE}.randn_tensor", fixed)
    with torch.no_grad():
        expected = ref_pipe(PROMPTS, image=images, strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert fixed.calls == 1
    actual = sdxl.pipe.image_to_image(PROMPTS, images, strength=0.6, sampler="euler", num_steps=STEPS,
                                      guidance_scale=GUIDANCE, latents=added)
    assert_images_close(actual, expected, "SDXL image_to_image strength=0.6")


def test_base_to_refiner(tiny) -> None:
    """diffusers' documented ensemble of experts: the base denoises the first 80% and hands its latents over."""
    base, refiner = tiny("sdxl"), tiny("sdxl_refiner")
    assert refiner.pipe.requires_aesthetics_score and not base.pipe.requires_aesthetics_score
    steps, switch = 10, 0.8
    aesthetics = dict(aesthetic_score=7.5, negative_aesthetic_score=1.5)

    expected_latents = reference(base, EULER, steps=steps, negative_prompt=NEGATIVES, denoising_end=switch,
                                 output_type="latent")
    latents = generate(base, EULER, steps=steps, negative_prompt=NEGATIVES, denoising_end=switch, output="latent")
    assert_images_close(latents, expected_latents.numpy(), "SDXL base latents with denoising_end")

    set_scheduler(refiner, EulerDiscreteScheduler)
    with torch.no_grad():
        expected = refiner.torch_pipe(PROMPTS, image=expected_latents, num_inference_steps=steps,
                                      denoising_start=switch, guidance_scale=GUIDANCE, output_type="np",
                                      negative_prompt=NEGATIVES, **aesthetics).images
    refined = refiner.pipe.image_to_image(PROMPTS, latents, sampler="euler", num_steps=steps, denoising_start=switch,
                                          guidance_scale=GUIDANCE, negative_prompt=NEGATIVES, **aesthetics)
    assert refined.shape == (2, HEIGHT, WIDTH, 3)
    assert_images_close(refined, expected, "SDXL refiner with denoising_start")
    default_aesthetics = refiner.pipe.image_to_image(PROMPTS, latents, sampler="euler", num_steps=steps,
                                                     denoising_start=switch, guidance_scale=GUIDANCE,
                                                     negative_prompt=NEGATIVES)
    assert_differ(refined, default_aesthetics, "aesthetic_score", tol=1e-4)
