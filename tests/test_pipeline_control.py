"""ControlNet, T2I-Adapter and IP-Adapter through the generation API, against diffusers' pipelines on the tiny models:
StableDiffusionControlNetPipeline (one and two ControlNets, guess mode, start/end), its img2img and inpaint
variants, StableDiffusionXLControlNetPipeline, StableDiffusionAdapterPipeline and load_ip_adapter. Same
starting latents on both sides; final images within 2e-3. Checks are grouped to reuse compiles."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler, PNDMScheduler

import sdjax
from tests.conftest import (
    GUIDANCE,
    HEIGHT,
    PROMPTS,
    STEPS,
    WIDTH,
    FixedNoise,
    assert_differ,
    assert_images_close,
    input_images,
    noise,
)
from tests.reference.control_models import controlnet_for
from tests.test_pipeline import CompileCounter, masks

pytestmark = pytest.mark.usefixtures("fast_compile")
SAMPLER = "ddim"


@pytest.fixture(scope="module")
def nets(tiny, tmp_path_factory):
    """{kind: [(torch ControlNet, sdjax ControlNet), ...]}: two random ControlNets for SD1, one for SDXL."""
    out = {}
    for kind, seeds in (("sd1", (3, 4)), ("sdxl", (5,))):
        out[kind] = []
        for seed in seeds:
            torch_net = controlnet_for(tiny(kind).torch_pipe.unet, seed)
            folder = tmp_path_factory.mktemp(f"controlnet_{kind}_{seed}")
            torch_net.save_pretrained(folder, safe_serialization=True)
            out[kind].append((torch_net, sdjax.load_controlnet(folder)))
    return out


def reference(tiny, cls, monkeypatch=None, module=None, added=None, prompts=PROMPTS, scheduler=DDIMScheduler,
              steps=STEPS, **kwargs) -> np.ndarray:
    """A diffusers pipeline of ``cls`` on the tiny model's components with ``scheduler`` (DDIM); image tasks get
    ``added`` as their one noise draw."""
    pipe = cls.from_pipe(tiny.torch_pipe, **{k: kwargs.pop(k) for k in ("controlnet", "adapter") if k in kwargs})
    pipe.scheduler = scheduler.from_config(tiny.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    if added is not None:
        monkeypatch.setattr(f"{module}.randn_tensor", FixedNoise(added))
    else:
        kwargs["latents"] = torch.from_numpy(noise(len(prompts)))
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images


def options(sampler=SAMPLER, num_steps=STEPS, **kwargs):
    return dict(sampler=sampler, num_steps=num_steps, guidance_scale=GUIDANCE, **kwargs)


def test_sd1_controlnet_text_to_image(tiny, nets, monkeypatch) -> None:
    sd1 = tiny("sd1")
    (torch_a, net_a), (torch_b, net_b) = nets["sd1"]
    cls = diffusers.StableDiffusionControlNetPipeline
    control = input_images(5, 2)
    latents = noise(2)
    compiles = CompileCounter(monkeypatch)

    def t2i(**kwargs):
        return sd1.pipe.text_to_image(PROMPTS, latents=latents, height=HEIGHT, width=WIDTH, **options(**kwargs))

    # one ControlNet: scale and start/end are traced, so the three share one compile. PNDM: diffusers' loop
    # counter runs over its N + 1 timesteps (the first step evaluates twice), and start/end count those.
    runs = {}
    for scale, start, end in ((0.8, 0.0, 1.0), (1.3, 0.2, 0.8), (0.5, 0.4, 1.0)):
        runs[scale] = actual = t2i(controlnet=net_a, control_image=control[0], controlnet_conditioning_scale=scale,
                                   control_guidance_start=start, control_guidance_end=end, sampler="pndm")
        expected = reference(sd1, cls, controlnet=torch_a, image=control[0], height=HEIGHT, width=WIDTH,
                             controlnet_conditioning_scale=scale, control_guidance_start=start,
                             control_guidance_end=end, scheduler=PNDMScheduler)
        assert_images_close(actual, expected, f"SD1 ControlNet PNDM scale={scale} start={start} end={end}")
    # scale 0 (the same compile) is the plain pipeline: the ControlNet changes the images
    off = t2i(controlnet=net_a, control_image=control[0], controlnet_conditioning_scale=0.0, sampler="pndm")
    assert compiles.take() <= 1
    assert_differ(runs[0.8], runs[1.3], "the conditioning scale and start/end")
    assert_differ(runs[0.8], off, "the ControlNet")

    # two ControlNets (MultiControlNet), each its own image
    multi = dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.2],
                 control_guidance_end=[0.6, 1.0])
    actual = t2i(controlnet=[net_a, net_b], control_image=[control[1], control[0]], **multi)
    expected = reference(sd1, cls, controlnet=[torch_a, torch_b], image=[control[1], control[0]], height=HEIGHT,
                         width=WIDTH, **multi)
    assert_images_close(actual, expected, "SD1 MultiControlNet")

    # guess mode: the ControlNet on the conditional pass only, the unconditional pass without residuals
    actual = t2i(controlnet=net_a, control_image=control[0], guess_mode=True, controlnet_conditioning_scale=0.9)
    expected = reference(sd1, cls, controlnet=torch_a, image=control[0], height=HEIGHT, width=WIDTH,
                         guess_mode=True, controlnet_conditioning_scale=0.9)
    assert_images_close(actual, expected, "SD1 ControlNet guess mode")


def test_sd1_controlnet_image_to_image_and_inpaint(tiny, nets, monkeypatch) -> None:
    sd1 = tiny("sd1")
    torch_a, net_a = nets["sd1"][0]
    images, control, added = input_images(), input_images(5, 2), noise(seed=5)
    # Heun: diffusers' start/end count its 2n - 1 evaluations of the n steps run (after the strength cut), so a
    # step's two evaluations can fall on either side of a bound (strength 0.8, start 0.25: 4 steps, 7 evaluations)
    for strength, start, end in ((0.6, 0.0, 1.0), (0.8, 0.25, 0.75)):
        kwargs = dict(controlnet_conditioning_scale=0.9, control_guidance_start=start, control_guidance_end=end)
        expected = reference(sd1, diffusers.StableDiffusionControlNetImg2ImgPipeline, monkeypatch,
                             "diffusers.pipelines.controlnet.pipeline_controlnet_img2img", added,
                             controlnet=torch_a, image=images, control_image=control, strength=strength,
                             scheduler=HeunDiscreteScheduler, **kwargs)
        actual = sd1.pipe.image_to_image(PROMPTS, images, strength=strength, latents=added, controlnet=net_a,
                                         control_image=control, **options(sampler="heun", **kwargs))
        assert_images_close(actual, expected, f"SD1 ControlNet img2img Heun strength={strength} start={start} "
                                              f"end={end}")

    # inpainting with an ordinary (4-channel) UNet
    kwargs = dict(controlnet_conditioning_scale=1.1, control_guidance_end=0.8)
    expected = reference(sd1, diffusers.StableDiffusionControlNetInpaintPipeline, monkeypatch,
                         "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint", added, controlnet=torch_a,
                         image=images, mask_image=masks(), control_image=control, strength=1.0, height=HEIGHT,
                         width=WIDTH, **kwargs)
    actual = sd1.pipe.inpaint(PROMPTS, images, masks(), latents=added, controlnet=net_a, control_image=control,
                              **options(**kwargs))
    assert_images_close(actual, expected, "SD1 ControlNet inpaint")


def test_sdxl_controlnet_text_to_image(tiny, nets) -> None:
    sdxl = tiny("sdxl")
    torch_net, net = nets["sdxl"][0]
    control = input_images(7, 1)[0]
    kwargs = dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.2)
    expected = reference(sdxl, diffusers.StableDiffusionXLControlNetPipeline, controlnet=torch_net, image=control,
                         height=HEIGHT, width=WIDTH, **kwargs)
    actual = sdxl.pipe.text_to_image(PROMPTS, latents=noise(2), height=HEIGHT, width=WIDTH, controlnet=net,
                                     control_image=control, **options(**kwargs))
    assert_images_close(actual, expected, "SDXL ControlNet")


def test_sdxl_controlnet_image_to_image_and_inpaint(tiny, nets, monkeypatch) -> None:
    """StableDiffusionXLControlNetImg2ImgPipeline (two strengths and start/end, one compile) and
    StableDiffusionXLControlNetInpaintPipeline (the 4-channel SDXL UNet)."""
    sdxl = tiny("sdxl")
    torch_net, net = nets["sdxl"][0]
    images, control, added = input_images(2), input_images(7, 2), noise(seed=8)
    runs = []
    for strength, start, end in ((0.6, 0.0, 1.0), (0.8, 0.25, 0.75)):
        kwargs = dict(controlnet_conditioning_scale=0.9, control_guidance_start=start, control_guidance_end=end)
        expected = reference(sdxl, diffusers.StableDiffusionXLControlNetImg2ImgPipeline, monkeypatch,
                             "diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl_img2img", added,
                             controlnet=torch_net, image=images, control_image=control, strength=strength, **kwargs)
        runs.append(sdxl.pipe.image_to_image(PROMPTS, images, strength=strength, latents=added, controlnet=net,
                                             control_image=control, **options(**kwargs)))
        assert_images_close(runs[-1], expected, f"SDXL ControlNet img2img strength={strength} start={start} "
                                                f"end={end}")
    assert_differ(runs[0], runs[1], "strength and start/end")

    kwargs = dict(controlnet_conditioning_scale=1.2, control_guidance_start=0.2, strength=0.8)
    expected = reference(sdxl, diffusers.StableDiffusionXLControlNetInpaintPipeline, monkeypatch,
                         "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint_sd_xl", added,
                         controlnet=torch_net, image=images, mask_image=masks(), control_image=control,
                         height=HEIGHT, width=WIDTH, **kwargs)
    actual = sdxl.pipe.inpaint(PROMPTS, images, masks(), latents=added, controlnet=net, control_image=control,
                               **options(**kwargs))
    assert_images_close(actual, expected, "SDXL ControlNet inpaint")


def test_sd1_inpainting_unet_with_controlnet(tiny, nets, monkeypatch) -> None:
    """A 9-channel inpainting UNet with a ControlNet, as StableDiffusionControlNetInpaintPipeline: the ControlNet
    sees the 4 latent channels, the UNet those plus the mask and the masked image's latents. Scale and start/end
    are traced: both runs share one compile."""
    model = tiny("sd1_inpaint")
    torch_a, net_a = nets["sd1"][0]  # SD1's ControlNets fit the inpainting UNet: the same encoder
    images, control, added = input_images(3, 2), input_images(5, 2), noise(seed=6)
    runs = []
    for scale, start, end in ((1.1, 0.0, 1.0), (0.7, 0.3, 0.7)):
        kwargs = dict(controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                      strength=0.75)
        expected = reference(model, diffusers.StableDiffusionControlNetInpaintPipeline, monkeypatch,
                             "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint", added, controlnet=torch_a,
                             image=images, mask_image=masks(), control_image=control, height=HEIGHT, width=WIDTH,
                             **kwargs)
        runs.append(model.pipe.inpaint(PROMPTS, images, masks(), latents=added, controlnet=net_a,
                                       control_image=control, **options(**kwargs)))
        assert_images_close(runs[-1], expected, f"9-channel inpaint ControlNet scale={scale} start={start} end={end}")
    assert_differ(runs[0], runs[1], "the conditioning scale and start/end")


def t2i_adapter(tmp_path, seed: int, **config):
    """A random diffusers T2IAdapter of ``config``, saved and loaded: (torch adapter, sdjax adapter)."""
    from diffusers import T2IAdapter

    from tests.reference.control_models import randomise_fan_in

    torch_adapter = T2IAdapter(**config).eval()
    randomise_fan_in(torch_adapter, seed)
    folder = tmp_path / f"adapter_{seed}"
    torch_adapter.save_pretrained(folder)
    return torch_adapter, sdjax.load_t2i_adapter(folder)


def test_t2i_adapter_text_to_image(tiny, tmp_path) -> None:
    """StableDiffusionAdapterPipeline with a full adapter. (The light adapter's parity is module-level, in
    tests/test_t2i_adapter.py: its features reach the UNet by the same path, leftover ones as in the SDXL test.)"""
    from tests.test_t2i_adapter import CONFIGS

    sd1 = tiny("sd1")
    images = input_images(9, 2)
    torch_adapter, adapter = t2i_adapter(tmp_path, 11, **CONFIGS["full"])
    # Heun: 2N - 1 evaluations, every one with the features (diffusers' SD adapter pipeline has no factor)
    expected = reference(sd1, diffusers.StableDiffusionAdapterPipeline, adapter=torch_adapter, image=images,
                         height=HEIGHT, width=WIDTH, adapter_conditioning_scale=0.7, scheduler=HeunDiscreteScheduler)
    actual = sd1.pipe.text_to_image(PROMPTS, latents=noise(2), height=HEIGHT, width=WIDTH, adapter=adapter,
                                    adapter_image=images, adapter_conditioning_scale=0.7, **options(sampler="heun"))
    assert_images_close(actual, expected, "SD1 T2I-Adapter")
    with pytest.raises(ValueError, match="adapter_conditioning_factor: only SDXL"):
        sd1.pipe.text_to_image(PROMPTS, adapter=adapter, adapter_image=images, adapter_conditioning_factor=0.5)


def test_sdxl_t2i_adapter_text_to_image(tiny, tmp_path) -> None:
    """StableDiffusionXLAdapterPipeline with a full_adapter_xl on one-channel sketches; the conditioning factor
    (traced) at 1 and 0.6 (the features on the first int(5 * 0.6) = 3 evaluations). Features 1/16, 1/16, 1/32,
    1/32 of the image: the tiny 2-level UNet takes the first two, both sides leave the others."""
    sdxl = tiny("sdxl")
    torch_adapter, adapter = t2i_adapter(tmp_path, 12, in_channels=1, channels=(32, 64, 64, 64), num_res_blocks=2,
                                         downscale_factor=16, adapter_type="full_adapter_xl")
    sketches = [im.convert("L") for im in input_images(9, 2)]
    runs = []
    for factor in (1.0, 0.6):
        expected = reference(sdxl, diffusers.StableDiffusionXLAdapterPipeline, adapter=torch_adapter, image=sketches,
                             height=HEIGHT, width=WIDTH, adapter_conditioning_scale=0.8,
                             adapter_conditioning_factor=factor)
        runs.append(sdxl.pipe.text_to_image(PROMPTS, latents=noise(2), height=HEIGHT, width=WIDTH, adapter=adapter,
                                            adapter_image=sketches, adapter_conditioning_scale=0.8,
                                            adapter_conditioning_factor=factor, **options()))
        assert_images_close(runs[-1], expected, f"SDXL T2I-Adapter factor={factor}")
    assert_differ(runs[0], runs[1], "adapter_conditioning_factor")


def test_ip_adapter_text_to_image(tiny, tmp_path) -> None:
    from PIL import Image
    from safetensors.torch import save_file

    from tests.test_ip_adapter import build_image_encoder, ip_adapter_state

    sd1 = tiny("sd1")
    torch_pipe = sd1.fresh_torch()
    models = tmp_path / "models"
    build_image_encoder(models / "image_encoder")
    state = ip_adapter_state(torch_pipe.unet, False, 1)
    save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()},
              str(models / "ip-adapter_tiny.safetensors"))
    torch_pipe.load_ip_adapter(str(tmp_path), subfolder="models", image_encoder_folder="image_encoder",
                               weight_name="ip-adapter_tiny.safetensors")
    torch_pipe.set_ip_adapter_scale(0.6)
    torch_pipe.scheduler = DDIMScheduler.from_config(sd1.scheduler_config)
    torch_pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (41, 37, 3), dtype=np.uint8))
    prompt = PROMPTS[:1]
    with torch.no_grad():
        expected = torch_pipe(prompt, ip_adapter_image=image, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              latents=torch.from_numpy(noise(1)), height=HEIGHT, width=WIDTH, output_type="np").images
    pipe = sd1.pipe.with_ip_adapter(models / "ip-adapter_tiny.safetensors", image_encoder=models / "image_encoder",
                                    scale=0.6)
    assert "to_k_ip_0" not in str(sd1.pipe.params["unet"].keys())  # the original pipeline is untouched
    actual = pipe.text_to_image(prompt, latents=noise(1), height=HEIGHT, width=WIDTH, ip_adapter_image=image,
                                **options())
    assert_images_close(actual, expected, "SD1 IP-Adapter")
    off = pipe.text_to_image(prompt, latents=noise(1), height=HEIGHT, width=WIDTH, ip_adapter_image=image,
                             ip_adapter_scale=0.0, **options())
    assert_differ(actual, off, "the IP-Adapter scale")
    with pytest.raises(ValueError, match="ip_adapter_image"):
        pipe.text_to_image(prompt, height=HEIGHT, width=WIDTH, **options())


def test_bad_control_options_name_the_keyword(tiny, nets) -> None:
    sd1 = tiny("sd1")
    net = nets["sd1"][0][1]
    image = input_images(1, 1)[0]
    t2i = sd1.pipe.text_to_image
    with pytest.raises(ValueError, match="control_image"):
        t2i(PROMPTS, controlnet=net)
    with pytest.raises(ValueError, match="controlnet="):
        t2i(PROMPTS, control_image=image)
    with pytest.raises(TypeError, match="controlnet must be"):
        t2i(PROMPTS, controlnet="control_v11p_sd15_canny.pth", control_image=image)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        t2i(PROMPTS, controlnet=[net, net], control_image=[image, image], controlnet_conditioning_scale=[1, 2, 3])
    with pytest.raises(ValueError, match="control_image"):
        t2i(PROMPTS, controlnet=[net, net], control_image=[image])
    with pytest.raises(ValueError, match="control_guidance_start"):
        t2i(PROMPTS, controlnet=net, control_image=image, control_guidance_start=0.9, control_guidance_end=0.5)
    with pytest.raises(TypeError, match="guess_mode"):
        t2i(PROMPTS, controlnet=net, control_image=image, guess_mode="yes")
    with pytest.raises(TypeError, match="control_image"):
        t2i(PROMPTS, controlnet=net, control_image="edges.png")
    with pytest.raises(ValueError, match="control_image"):
        t2i(PROMPTS, controlnet=net, control_image=input_images(1, 3), height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="adapter_image"):
        t2i(PROMPTS, adapter_image=image)
    with pytest.raises(ValueError, match="ip_adapter_image"):
        t2i(PROMPTS, ip_adapter_scale=0.5)
