"""Guidance methods through the pipeline (every task), sweeps in one compile, what recompiles, and the
request's checks of bad input (each error names the keyword)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sdjax import guidance as g
from tests.conftest import HEIGHT, PROMPTS, STEPS, WIDTH, assert_differ, assert_images_close, input_images, noise
from tests.test_pipeline import CompileCounter, clip_skip_embeds, set_scheduler

pytestmark = pytest.mark.usefixtures("fast_compile")


def t2i(pipe, **kwargs):
    options = dict(sampler="euler", num_steps=STEPS, height=HEIGHT, width=WIDTH, latents=noise())
    return pipe.text_to_image(PROMPTS, **{**options, **kwargs})


def test_guidance_method_equals_the_shorthand_and_methods_take_effect(tiny, monkeypatch) -> None:
    pipe = tiny("sd1").pipe
    compiles = CompileCounter(monkeypatch)
    short = t2i(pipe, guidance_scale=6.0, guidance_rescale=0.3)
    method = t2i(pipe, guidance=g.CFG(6.0, rescale=0.3))
    np.testing.assert_array_equal(method, short)
    assert compiles.take() <= 1
    for other in (g.APG(6.0, momentum=0.3), g.Interval(g.CFG(6.0), sigma_min=1.0, sigma_max=8.0),
                  g.CFG(g.Linear(6.0)), g.CFGZeroStar(6.0), g.DynamicThresholding(12.0, mimic_scale=6.0)):
        assert_differ(t2i(pipe, guidance=other), short, type(other).__name__, tol=1e-4)


def test_numbers_never_recompile_kinds_do(tiny, monkeypatch) -> None:
    pipe = tiny("sd1").pipe
    compiles = CompileCounter(monkeypatch)
    first = t2i(pipe, guidance=g.Interval(g.APG(5.0, momentum=0.2), sigma_min=0.5, sigma_max=6.0))
    assert compiles.take() == 1
    for changed in (g.Interval(g.APG(7.0, momentum=0.6, eta=0.5, norm_threshold=2.0), 0.1, 3.0),
                    g.Interval(g.APG(3.0), 0.0, 100.0)):
        assert_differ(t2i(pipe, guidance=changed), first, str(changed), tol=1e-4)
        assert compiles.take() == 0, f"{changed} recompiled"
    # The first explicit eta no longer recompiles: eta is always an input (the sampler's default when unset).
    t2i(pipe, sampler="ddim")
    compiles.take()
    t2i(pipe, sampler="ddim", eta=0.5)
    assert compiles.take() == 0, "an explicit eta recompiled"
    # A plain guidance_scale <= 1 drops the unconditional pass: a different plan (documented).
    t2i(pipe, guidance_scale=1.0)
    assert compiles.take() == 1


@pytest.mark.parametrize("task", ["image", "inpaint"])
def test_image_tasks_take_any_method(tiny, task) -> None:
    pipe = tiny("sd1").pipe
    images = input_images()
    from PIL import Image

    mask = Image.fromarray(np.tile((np.arange(WIDTH) > WIDTH // 2).astype(np.uint8) * 255, (HEIGHT, 1)))
    negative = ["blurry", "dark"]  # Perp-Neg equals CFG when the negative is the empty prompt
    call = (lambda **kw: pipe.image_to_image(PROMPTS, images, strength=0.7, negative_prompt=negative, **kw)) \
        if task == "image" else (lambda **kw: pipe.inpaint(PROMPTS, images, mask, strength=0.9,
                                                           negative_prompt=negative, **kw))
    base = call(sampler="ddim", num_steps=STEPS, guidance_scale=5.0, seed=3)
    for method in (g.CFGPlusPlus(0.5), g.PerpNeg(5.0), g.DynamicThresholding(9.0, mimic_scale=5.0),
                   g.ClassifierGuidance(lambda x, t: -(x**2).sum(axis=(1, 2, 3)), 50.0, inner=g.CFG(5.0))):
        out = call(sampler="ddim", num_steps=STEPS, guidance=method, seed=3)
        assert out.shape == base.shape and np.isfinite(out).all()
        assert_differ(out, base, f"{task} {type(method).__name__}", tol=1e-4)


def test_sweep_is_one_compile_and_each_setting_equals_its_single_run(tiny, monkeypatch) -> None:
    pipe = tiny("sd1").pipe
    compiles = CompileCounter(monkeypatch)
    scales = [2.0, 5.0, 9.0]
    swept = t2i(pipe, guidance_scale=scales, sampler="dpmpp_2m")
    assert swept.shape == (3, 2, HEIGHT, WIDTH, 3)
    assert compiles.take() == 1
    for k, scale in enumerate(scales):
        np.testing.assert_allclose(swept[k], t2i(pipe, guidance_scale=scale, sampler="dpmpp_2m"), atol=1e-4)
    # a method sweep: interval bounds and APG momentum together
    method = g.Interval(g.APG(5.0, momentum=np.array([0.0, 0.5])), sigma_min=0.3, sigma_max=np.array([2.0, 9.0]))
    both = t2i(pipe, guidance=method, output="pil")
    assert len(both) == 2 and len(both[0]) == 2
    second = t2i(pipe, guidance=g.Interval(g.APG(5.0, momentum=0.5), sigma_min=0.3, sigma_max=9.0), output="pil")
    diff = np.abs(np.asarray(both[1][0], np.int16) - np.asarray(second[0], np.int16))
    assert diff.max() <= 1


def test_guidance_and_guidance_scale_together_is_an_error(tiny) -> None:
    pipe = tiny("sd1").pipe
    with pytest.raises(ValueError, match="either guidance= .* or guidance_scale="):
        pipe.text_to_image("x", guidance=g.CFG(5.0), guidance_scale=5.0)
    with pytest.raises(ValueError, match="CFG\\+\\+ does not work with sampler 'lms'"):
        pipe.text_to_image("x", guidance=g.CFGPlusPlus(0.5), sampler="lms")
    with pytest.raises(ValueError, match="ancestral mean; sampler 'ddim'"):
        pipe.text_to_image("x", guidance=g.ClassifierGuidance(lambda x, t: x.sum((1, 2, 3)), 1.0, algorithm=1),
                           sampler="ddim")
    with pytest.raises(TypeError, match="guidance must be a method"):
        pipe.text_to_image("x", guidance=7.5)
    with pytest.raises(ValueError, match="different lengths"):
        pipe.text_to_image("x", guidance=g.CFG(np.ones(3), rescale=np.zeros(2)))


@pytest.mark.parametrize(("kwargs", "message", "error"), [
    (dict(seed=1.5), "seed must be an integer", TypeError),
    (dict(seed=None), "seed must be an integer", TypeError),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*32\)", ValueError),
    (dict(seed=2**32), r"seed must be in \[0, 2\*\*32\)", ValueError),
    (dict(height=0), "height must be a positive integer", ValueError),
    (dict(num_steps=2.5), "num_steps must be a positive integer", ValueError),
    (dict(eta=-0.1), "eta must be >= 0", ValueError),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]", ValueError),
    (dict(guidance_scale="7"), "guidance_scale must be a number", TypeError),
])
def test_bad_api_input_is_named_before_any_work(tiny, kwargs, message, error) -> None:
    with pytest.raises(error, match=message):
        tiny("sd1").pipe.text_to_image("x", **kwargs)


def test_bad_prompts_and_images(tiny) -> None:
    pipe = tiny("sd1").pipe
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        pipe.text_to_image(None)
    with pytest.raises(TypeError, match="image: give a PIL image or an array"):
        pipe.image_to_image("x", "in.png")
    with pytest.raises(ValueError, match="text_to_image takes no image"):
        pipe._generate("text", dict(prompt="x", image=np.zeros((1, 8, 8, 3)), options={}))


def test_inpainting_model_without_mask_is_an_error(tiny) -> None:
    pipe = tiny("sd1_inpaint").pipe
    with pytest.raises(ValueError, match="inpainting model.*use inpaint\\(\\) with a mask"):
        pipe.text_to_image("x")


def test_latents_without_a_size_give_their_size_as_diffusers(tiny) -> None:
    model = tiny("sd1")
    latents = np.random.default_rng(3).standard_normal((2, 4, 6, 10)).astype(np.float32)  # 48x80 pixels
    set_scheduler(model, EulerDiscreteScheduler)
    with torch.no_grad():
        want = model.torch_pipe(PROMPTS, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                                output_type="np", height=48, width=80).images
    got = model.pipe.text_to_image(PROMPTS, num_steps=STEPS, latents=latents)
    assert got.shape == (2, 48, 80, 3)
    assert_images_close(got, want, "latents without a size")


def test_deepest_clip_skip_diffusers_accepts(tiny) -> None:
    """clip_skip = number of layers (the embeddings' output) is valid, as in diffusers."""
    model = tiny("sd1")
    set_scheduler(model, EulerDiscreteScheduler)
    embeds = clip_skip_embeds(model.torch_pipe, PROMPTS, 3)
    with torch.no_grad():
        want = model.torch_pipe(prompt_embeds=embeds, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                                guidance_scale=1.0, latents=torch.from_numpy(noise()), output_type="np").images
    got = t2i(model.pipe, guidance_scale=1.0, clip_skip=3)
    assert_images_close(got, want, "clip_skip=3 on a 3-layer encoder")


def test_prompt_embeds_in_and_out(tiny) -> None:
    """encode_prompt's embeddings fed back give the same images as the text; diffusers' layouts."""
    for kind in ("sd1", "sdxl"):  # SDXL: given negative embeddings are used, not zeroed (force_zeros_for_empty_prompt)
        pipe = tiny(kind).pipe
        embeds = pipe.encode_prompt(PROMPTS, negative_prompt=["blurry", "ugly"])
        from_text = t2i(pipe, negative_prompt=["blurry", "ugly"], guidance_scale=5.0)
        from_embeds = pipe.text_to_image(sampler="euler", num_steps=STEPS, height=HEIGHT, width=WIDTH,
                                         latents=noise(), guidance_scale=5.0, **embeds._asdict())
        np.testing.assert_allclose(from_embeds, from_text, atol=1e-5, err_msg=kind)
        # only the prompt's embeddings: the negative is encoded from its text, padded to the same length
        partial = pipe.text_to_image(negative_prompt=["blurry", "ugly"], sampler="euler", num_steps=STEPS,
                                     height=HEIGHT, width=WIDTH, latents=noise(), guidance_scale=5.0,
                                     prompt_embeds=embeds.prompt_embeds,
                                     pooled_prompt_embeds=embeds.pooled_prompt_embeds)
        np.testing.assert_allclose(partial, from_text, atol=1e-5, err_msg=kind)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        pipe.text_to_image("x", prompt_embeds=embeds.prompt_embeds)
    sdxl = tiny("sdxl").pipe
    with pytest.raises(ValueError, match="SDXL model needs pooled_prompt_embeds"):
        sdxl.text_to_image(prompt_embeds=sdxl.encode_prompt(PROMPTS).prompt_embeds)
