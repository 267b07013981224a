"""End-to-end parity and behaviour of the generation API (SD 1.x / 2.x) against diffusers on tiny models.

Every parity check gives both sides the same starting latents (and, for image-to-image and inpainting, the same
added noise) and compares final [0, 1] images: max abs difference <= 2e-3. Each compiled configuration
(model, sampler, steps, shape, task) costs seconds to compile, so the checks are grouped to reuse them.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from sdjax.generation import core as generation_core
from sdjax.samplers.registry import SAMPLER_INFO, SAMPLERS
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

# sdjax (sampler, sigma schedule) -> the diffusers scheduler class and the from_config arguments it reproduces.
# The base config is the model's own (betas, timestep spacing, prediction type), so only the sampler changes.
DETERMINISTIC = {
    ("ddim", None): (DDIMScheduler, {}),  # eta = 0: the pipelines' default
    ("pndm", None): (PNDMScheduler, {"skip_prk_steps": True}),
    ("lms", None): (LMSDiscreteScheduler, {}),
    ("euler", None): (EulerDiscreteScheduler, {}),
    ("heun", None): (HeunDiscreteScheduler, {}),
    ("dpm2", None): (KDPM2DiscreteScheduler, {}),
    ("dpmpp_2m", None): (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m", "karras"): (DPMSolverMultistepScheduler,
                             {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    ("unipc", None): (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2"}),
}
# Ancestral / SDE samplers: different random streams, so compared by reproducibility and statistics only.
STOCHASTIC = {
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "ddpm": (DDPMScheduler, {"variance_type": "fixed_small"}),
    "lcm": (LCMScheduler, {}),
}
SCHEDULERS = {**DETERMINISTIC, **{(name, None): spec for name, spec in STOCHASTIC.items()}}


def sampler_id(key: tuple[str, str | None]) -> str:
    return key[0] if key[1] is None else f"{key[0]}-{key[1]}"


def reference_t2i(tiny, key, prompts=PROMPTS, latents=None, guidance_scale=GUIDANCE, output_type="np",
                  **kwargs) -> np.ndarray:
    cls, overrides = SCHEDULERS[key]
    set_scheduler(tiny, cls, **overrides)
    latents = noise(2 if prompts is None else len(prompts)) if latents is None else latents
    with torch.no_grad():
        return tiny.torch_pipe(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                               guidance_scale=guidance_scale, latents=torch.from_numpy(latents),
                               output_type=output_type, **kwargs).images


def sdjax_t2i(tiny, key, prompts=PROMPTS, latents=None, guidance_scale=GUIDANCE, **kwargs) -> np.ndarray:
    latents = noise(len(prompts)) if latents is None else latents
    return tiny.pipe.text_to_image(prompts, sampler=key[0], schedule=key[1], num_steps=STEPS,
                                   guidance_scale=guidance_scale, latents=latents, height=HEIGHT, width=WIDTH, **kwargs)


def clip_skip_embeds(torch_pipe, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """SD1/SD2 prompt embeddings with CLIP skip, by hand (diffusers' own path needs transformers < 5.6): the
    hidden state ``clip_skip`` layers before the last, through the final layer norm."""
    ids = torch_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        out = torch_pipe.text_encoder(ids, output_hidden_states=True)
        return torch_pipe.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def test_sampler_table_covers_every_deterministic_sampler() -> None:
    deterministic = {name for name, s in SAMPLERS.items() if not s.stochastic}
    assert {name for name, _ in DETERMINISTIC} == deterministic
    assert set(STOCHASTIC) == {name for name, s in SAMPLERS.items() if s.stochastic}
    # ... and agrees with the documented table.
    for (name, schedule), (cls, _) in SCHEDULERS.items():
        assert cls.__name__ in SAMPLER_INFO[name]["diffusers"], name
        assert schedule is None or schedule in SAMPLER_INFO[name]["sigma_schedules"], name


# --- 1. every deterministic sampler on SD1 ----------------------------------------------------------------


@pytest.mark.parametrize("key", list(DETERMINISTIC), ids=sampler_id)
def test_sd1_sampler_parity(tiny, key) -> None:
    sd1 = tiny("sd1")
    expected = reference_t2i(sd1, key)
    actual = sdjax_t2i(sd1, key)
    assert actual.dtype == np.float32 and actual.shape == (2, HEIGHT, WIDTH, 3)
    assert_images_close(actual, expected, f"SD1 {sampler_id(key)}")
    assert_differ(actual[0], actual[1], "a different prompt and starting noise")


# --- 2. negative prompt, CLIP skip, guidance rescale (SD1, SD2 v-prediction) ------------------------------


@pytest.mark.parametrize("kind, key", [("sd1", ("euler", None)), ("sd2", ("euler", None)),
                                       ("sd2", ("dpmpp_2m", "karras"))], ids=["sd1-euler", "sd2-euler",
                                                                              "sd2-dpmpp_2m-karras"])
def test_negative_prompt_and_guidance_rescale(tiny, kind, key) -> None:
    model = tiny(kind)
    plain = sdjax_t2i(model, key)
    assert_images_close(plain, reference_t2i(model, key), f"{kind} {sampler_id(key)}")

    negative = sdjax_t2i(model, key, negative_prompt=NEGATIVES)
    assert_images_close(negative, reference_t2i(model, key, negative_prompt=NEGATIVES),
                        f"{kind} {sampler_id(key)} negative prompt")
    assert_differ(negative, plain, "the negative prompt")

    # A strong guidance scale, where rescaling matters more (the tiny models' prompts differ little).
    strong = dict(negative_prompt=NEGATIVES, guidance_scale=4 * GUIDANCE)
    rescaled = sdjax_t2i(model, key, **strong, guidance_rescale=0.7)
    assert_images_close(rescaled, reference_t2i(model, key, **strong, guidance_rescale=0.7),
                        f"{kind} {sampler_id(key)} guidance_rescale=0.7")
    print(np.abs(rescaled - sdjax_t2i(model, key, **strong)).max())
    assert_differ(rescaled, sdjax_t2i(model, key, **strong), "guidance_rescale")


@pytest.mark.parametrize("kind, key", [("sd1", ("ddim", None)), ("sd2", ("euler", None))],
                         ids=["sd1-ddim", "sd2-euler"])
def test_clip_skip(tiny, kind, key) -> None:
    # The tiny text encoders have 3 layers, so clip_skip=1 (A1111's "Clip skip: 2") is the deepest allowed.
    model = tiny(kind)
    clip_skip = 1
    embeds = clip_skip_embeds(model.torch_pipe, PROMPTS, clip_skip)
    negative_embeds = clip_skip_embeds(model.torch_pipe, NEGATIVES, clip_skip)
    expected = reference_t2i(model, key, prompts=None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    actual = sdjax_t2i(model, key, negative_prompt=NEGATIVES, clip_skip=clip_skip)
    assert_images_close(actual, expected, f"{kind} {sampler_id(key)} clip_skip={clip_skip}")
    # The empty negative prompt gets the same CLIP skip (A1111's convention, unlike diffusers').
    empty_embeds = clip_skip_embeds(model.torch_pipe, ["", ""], clip_skip)
    expected = reference_t2i(model, key, prompts=None, prompt_embeds=embeds, negative_prompt_embeds=empty_embeds)
    actual_empty = sdjax_t2i(model, key, clip_skip=clip_skip)
    assert_images_close(actual_empty, expected, f"{kind} {sampler_id(key)} clip_skip={clip_skip}, no negative")
    assert_differ(actual, actual_empty, "the negative prompt")


# --- 3. image-to-image and inpainting ---------------------------------------------------------------------

IMG2IMG_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
INPAINT_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"


def masks() -> list:
    """Two different masks (white = repaint) whose edges are not on the 8-pixel latent grid."""
    from PIL import Image

    out = []
    for top, left, bottom, right in ((13, 21, 45, 70), (3, 50, 60, 93)):
        m = np.zeros((HEIGHT, WIDTH), np.uint8)
        m[top:bottom, left:right] = 255
        out.append(Image.fromarray(m))
    return out


def derived(tiny, cls):
    """A diffusers pipeline of another task sharing the tiny model's components."""
    key = f"_sdjax_{cls.__name__}"
    if not hasattr(tiny.torch_pipe, key):
        pipe = cls.from_pipe(tiny.torch_pipe)
        pipe.set_progress_bar_config(disable=True)
        setattr(tiny.torch_pipe, key, pipe)
    return getattr(tiny.torch_pipe, key)


def run_reference(monkeypatch, module: str, torch_pipe, added_noise: np.ndarray, **kwargs) -> np.ndarray:
    """Run a diffusers image pipeline with ``added_noise`` as its one noise draw (the VAE posterior samples
    are the means: see conftest)."""
    fixed = FixedNoise(added_noise)
    monkeypatch.setattr(f"{module}.randn_tensor", fixed)
    with torch.no_grad():
        images = torch_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                            generator=torch.Generator().manual_seed(0), **kwargs).images
    assert fixed.calls == 1, f"diffusers drew noise {fixed.calls} times"
    return images


def test_sd1_image_to_image(tiny, monkeypatch) -> None:
    sd1 = tiny("sd1")
    key = ("dpmpp_2m", None)
    ref_pipe = set_scheduler(sd1, SCHEDULERS[key][0], derived(sd1, diffusers.StableDiffusionImg2ImgPipeline),
                             **SCHEDULERS[key][1])
    images, added = input_images(), noise(seed=5)
    results = {}
    for strength in (0.6, 0.8):
        expected = run_reference(monkeypatch, IMG2IMG_MODULE, ref_pipe, added, image=images, strength=strength)
        actual = sd1.pipe.image_to_image(PROMPTS, images, strength=strength, sampler=key[0], num_steps=STEPS,
                                         guidance_scale=GUIDANCE, latents=added)
        assert_images_close(actual, expected, f"SD1 image_to_image strength={strength}")
        results[strength] = actual
    assert_differ(results[0.6], results[0.8], "strength")


# diffusers re-imposes the known region after every scheduler call, also between the two model evaluations
# of a second-order step (Heun, DPM2): sdjax's samplers apply the blend to their intermediate latents too.
# (PNDM's warm-up is left out: diffusers' PNDM img2img/inpaint schedule is not self-consistent, see notes.)
@pytest.mark.parametrize("kind, strength, sampler", [
    ("sd1_inpaint", 1.0, "euler"),
    ("sd1_inpaint", 0.75, "ddim"),
    ("sd1", 0.75, "lms"),
    ("sd1", 1.0, "heun"),
    ("sd1", 0.75, "dpm2"),
], ids=["9ch-strength1-euler", "9ch-strength0.75-ddim", "4ch-strength0.75-lms", "4ch-strength1-heun",
        "4ch-strength0.75-dpm2"])
def test_inpaint(tiny, monkeypatch, kind, strength, sampler) -> None:
    model = tiny(kind)
    key = (sampler, None)
    ref_pipe = model.torch_pipe if kind == "sd1_inpaint" else derived(model, diffusers.StableDiffusionInpaintPipeline)
    set_scheduler(model, SCHEDULERS[key][0], ref_pipe, **SCHEDULERS[key][1])
    images, mask, added = input_images(1), masks(), noise(seed=6)
    expected = run_reference(monkeypatch, INPAINT_MODULE, ref_pipe, added, image=images, mask_image=mask,
                             strength=strength, height=HEIGHT, width=WIDTH)
    actual = model.pipe.inpaint(PROMPTS, images, mask, strength=strength, sampler=sampler, num_steps=STEPS,
                                guidance_scale=GUIDANCE, latents=added)
    assert_images_close(actual, expected, f"{kind} inpaint strength={strength} {sampler}")
    assert_differ(actual[0], actual[1], "a different prompt and mask")


# --- 5. ancestral and SDE samplers: seeded reproducibility and statistics ---------------------------------

STOCHASTIC_CASES = [(name, None) for name in STOCHASTIC] + [("ddim", 1.0)]


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


@pytest.mark.parametrize("name, eta", STOCHASTIC_CASES, ids=[n if e is None else f"{n}-eta{e:g}"
                                                             for n, e in STOCHASTIC_CASES])
def test_stochastic_sampler_seeds(tiny, name, eta) -> None:
    sd1 = tiny("sd1")
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    latents = noise(3, seed=3)
    latents[2] = latents[0]  # images 0 and 2 differ only in their index (their sampler noise)

    def run(seed, prompts=prompts, latents=latents):
        return sd1.pipe.text_to_image(prompts, sampler=name, num_steps=STEPS, guidance_scale=GUIDANCE, seed=seed,
                                      latents=latents, height=HEIGHT, width=WIDTH, eta=eta)

    first = run(1)
    np.testing.assert_array_equal(run(1), first, err_msg=f"{name}: the same seed gave different images")
    other = run(2)
    for i in range(3):
        assert_differ(other[i], first[i], f"{name}: another seed (image {i})")
    assert_differ(first[2], first[0], f"{name}: the image index (per-image keys)")
    if name in ("euler_a", "dpmpp_sde"):
        # An image is the same alone as in a batch: image 0 of 3 == a batch of 1.
        alone = run(1, prompts[:1], latents[:1])
        np.testing.assert_allclose(alone[0], first[0], atol=2e-5, err_msg=f"{name}: alone vs in a batch")

    # Statistics: with the same starting latents, two sdjax seeds differ from each other, and sdjax's samples
    # from diffusers', about as much as two diffusers seeds do (no noise, or half of it, would fail this).
    cls, overrides = STOCHASTIC.get(name) or SCHEDULERS[(name, None)]

    def reference(seed):
        set_scheduler(sd1, cls, **overrides)
        torch.manual_seed(seed)  # DPMSolverSDEScheduler seeds its Brownian tree from the global generator
        with torch.no_grad():
            return sd1.torch_pipe(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                                  guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
                                  generator=torch.Generator().manual_seed(seed),
                                  **({} if eta is None else {"eta": eta})).images

    ref_1, ref_2 = reference(1), reference(2)
    spread_ref = mean_abs(ref_1, ref_2)
    assert spread_ref > 1e-2, f"{name}: diffusers' seeds hardly matter ({spread_ref:.3g})"
    spread_seeds = mean_abs(first, other)
    spread_cross = (mean_abs(first, ref_1) + mean_abs(first, ref_2) + mean_abs(other, ref_1)
                    + mean_abs(other, ref_2)) / 4
    for what, spread in (("two sdjax seeds", spread_seeds), ("sdjax vs diffusers", spread_cross)):
        assert 0.75 < spread / spread_ref < 1.33, \
            f"{name}: {what} differ by {spread:.3g} on average, two diffusers seeds by {spread_ref:.3g}"


# --- 6. what recompiles and what doesn't ------------------------------------------------------------------


class CompileCounter:
    """Counts new compiled entries of the jitted generation core (``core._compiled(model, plan)``)."""

    def __init__(self, monkeypatch) -> None:
        self.new = 0
        original = generation_core._compiled

        def counting(model, plan):
            fn = original(model, plan)

            def call(*args):
                before = fn._cache_size()
                out = fn(*args)
                self.new += fn._cache_size() - before
                return out

            return call

        monkeypatch.setattr(generation_core, "_compiled", counting)

    def take(self) -> int:
        new, self.new = self.new, 0
        return new


def test_traced_options_do_not_recompile(tiny, monkeypatch) -> None:
    sd1 = tiny("sd1")
    compiles = CompileCounter(monkeypatch)

    def t2i(**kwargs):
        options = dict(sampler="euler", num_steps=STEPS, guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH)
        return sd1.pipe.text_to_image(PROMPTS, **{**options, **kwargs})

    base = t2i(seed=0)
    assert compiles.take() <= 1
    for change in (dict(seed=1), dict(seed=0, guidance_scale=3.0), dict(seed=0, guidance_rescale=0.5)):
        assert_differ(t2i(**change), base, str(change), tol=1e-4)  # took effect
        assert compiles.take() == 0, f"{change} recompiled"

    eta_low = t2i(sampler="ddim", eta=0.3)
    compiles.take()
    assert_differ(t2i(sampler="ddim", eta=0.8), eta_low, "eta", tol=1e-4)
    assert compiles.take() == 0, "a new eta recompiled"

    images, added = input_images(), noise(seed=5)
    results = []
    for strength in (0.6, 0.8, 1.0):
        results.append(sd1.pipe.image_to_image(PROMPTS, images, strength=strength, sampler="dpmpp_2m",
                                               num_steps=STEPS, guidance_scale=GUIDANCE, latents=added))
        if strength != 0.6:
            assert compiles.take() == 0, f"strength={strength} recompiled"
            assert_differ(results[-1], results[-2], f"strength={strength}", tol=1e-4)
        compiles.take()

    # A new step count or image size compiles once, and only once.
    for change in (dict(num_steps=STEPS + 1), dict(height=None, width=None)):
        first = t2i(**change)
        assert compiles.take() == 1, f"{change}: expected one new compile"
        np.testing.assert_array_equal(t2i(**change), first)
        assert compiles.take() == 0, f"{change}: compiled again"
    assert first.shape == (2, 64, 64, 3)  # the default size: the UNet's sample_size x 8


# --- 7. output kinds --------------------------------------------------------------------------------------


def test_output_kinds(tiny) -> None:
    sd1 = tiny("sd1")
    key = ("euler", None)
    pixels = sdjax_t2i(sd1, key)
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.float32 and pixels.shape == (2, HEIGHT, WIDTH, 3)
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0

    pil = sdjax_t2i(sd1, key, output="pil")
    assert isinstance(pil, list) and len(pil) == 2
    assert all(im.mode == "RGB" and im.size == (WIDTH, HEIGHT) for im in pil)
    np.testing.assert_allclose(np.stack([np.asarray(im) for im in pil]) / 255.0, pixels, atol=0.5 / 255 + 1e-6)

    latents = sdjax_t2i(sd1, key, output="latent")
    assert isinstance(latents, np.ndarray) and latents.shape == (2, 4, HEIGHT // 8, WIDTH // 8)
    expected = reference_t2i(sd1, key, output_type="latent")
    assert_images_close(latents, expected.numpy(), "SD1 euler latents")
    vae = sd1.torch_pipe.vae
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    decoded = (decoded / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    assert_images_close(pixels, decoded, "decoded latent output vs np output")


# --- 8. errors --------------------------------------------------------------------------------------------


def test_errors(tiny) -> None:
    sd1 = tiny("sd1").pipe
    with pytest.raises(ValueError, match="unknown sampler 'nope'") as info:
        sd1.text_to_image("x", sampler="nope")
    assert all(name in str(info.value) for name in SAMPLERS), f"not every sampler is listed: {info.value}"
    with pytest.raises(ValueError, match="height=60.*multiples of 8"):
        sd1.text_to_image("x", height=60, width=WIDTH)
    with pytest.raises(ValueError, match="width=100.*multiples of 8"):
        sd1.text_to_image("x", height=HEIGHT, width=100)
    wrong = noise()[:, :, :, :10]
    with pytest.raises(ValueError, match=r"latents has shape \(2, 4, 8, 10\); expected \(2, 4, 8, 12\)"):
        sd1.text_to_image(PROMPTS, latents=wrong, height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match=r"latents has shape \(1, 4, 8, 12\)"):
        sd1.text_to_image(PROMPTS, latents=noise(1), height=HEIGHT, width=WIDTH)
    for clip_skip in (4, -1):  # the tiny encoders have 3 layers: 0 to 3 are valid (3: the embeddings' output)
        with pytest.raises(ValueError, match=f"clip_skip={clip_skip}"):
            sd1.text_to_image("x", clip_skip=clip_skip, height=HEIGHT, width=WIDTH)
    with pytest.raises(TypeError, match="original_size: SDXL-only"):
        sd1.text_to_image("x", original_size=(64, 64))
    with pytest.raises(TypeError, match="aesthetic_score: SDXL-only"):
        sd1.image_to_image("x", input_images(1), aesthetic_score=6.0)
    with pytest.raises(ValueError, match="num_steps"):
        sd1.text_to_image("x", num_steps=0)
    with pytest.raises(ValueError, match="unknown output 'tensor'"):
        sd1.text_to_image("x", output="tensor")
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but the batch has 2"):
        sd1.text_to_image(PROMPTS, negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="strength"):
        sd1.image_to_image("x", input_images(1), strength=0.0)

    from PIL import Image

    image = input_images(1)[0]
    mask = Image.new("L", (WIDTH - 8, HEIGHT))
    with pytest.raises(ValueError, match="mask is 88x64 but the image is 96x64.*same size"):
        sd1.inpaint("x", image, mask)
    with pytest.raises(ValueError, match=r"image has shape \(2, 4, 8, 12\), latents: inpaint takes images"):
        sd1.inpaint(PROMPTS, noise(), Image.new("L", (WIDTH, HEIGHT)))


def test_long_prompt_is_encoded_in_chunks(tiny) -> None:
    # More than 75 tokens: two chunks of 77 (A1111), not cut. diffusers, given the same chunked embeddings
    # (checked against transformers chunk by chunk in test_text.py), draws the same images.
    sd1 = tiny("sd1")
    key = ("euler", None)
    prompts = ["cat " * 100, PROMPTS[1]]
    embeds = sd1.pipe.encode_prompt(prompts, negative_prompt=NEGATIVES)
    assert embeds.prompt_embeds.shape[1] == embeds.negative_prompt_embeds.shape[1] == 154
    expected = reference_t2i(sd1, key, prompts=None, prompt_embeds=torch.from_numpy(embeds.prompt_embeds),
                             negative_prompt_embeds=torch.from_numpy(embeds.negative_prompt_embeds))
    actual = sdjax_t2i(sd1, key, prompts=prompts, negative_prompt=NEGATIVES)
    assert_images_close(actual, expected, "100-token prompt")
    cut = sdjax_t2i(sd1, key, prompts=["cat " * 75, PROMPTS[1]], negative_prompt=NEGATIVES)
    assert_differ(actual[0], cut[0], "the tokens after the 75th")
