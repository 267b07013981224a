"""Seamless tiling (A1111's "Tiling"): circular padding in every UNet and VAE conv, at parity with diffusers'
modules whose Conv2d layers have ``padding_mode="circular"``, and images that wrap around."""

from __future__ import annotations

import jax
import numpy as np
import torch

from sdjax.convert.unet import convert_unet
from sdjax.convert.vae import convert_vae
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from tests.reference.unet_configs import SD1, build_torch_unet
from tests.reference.vae_configs import THREE_LEVEL_VAE, build_reference_vae


def circular(module: torch.nn.Module) -> torch.nn.Module:
    """What A1111's tiling does to a model: every Conv2d pads circularly."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.padding_mode = "circular"
    return module


def _close(actual, ref, what: str) -> None:
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0.5, f"{what}: reference nearly zero"
    err = float(np.abs(actual - ref).max())
    assert err <= 1e-4 * max(1.0, scale), f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_circular_unet_matches_diffusers(fast_compile) -> None:
    torch_unet = build_torch_unet("sd1", seed=5)
    config = UNetConfig.from_dict(dict(torch_unet.config))
    params = convert_unet({k: v.numpy() for k, v in torch_unet.state_dict().items()}, config)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 12, 20, 4), dtype=np.float32)
    t = rng.uniform(0, 1000, 2).astype(np.float32)
    context = rng.standard_normal((2, 7, SD1["cross_attention_dim"]), dtype=np.float32)
    with torch.inference_mode():
        ref_zeros = torch_unet(_nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample
        ref = circular(torch_unet)(_nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    model = UNet2DConditionModel(config, padding_mode="circular")
    out = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(params, sample, t, context)
    _close(out, ref, "circular UNet")
    assert float(np.abs(ref - ref_zeros.numpy().transpose(0, 2, 3, 1)).max()) > 1e-2  # the padding mattered


def test_circular_vae_matches_diffusers(fast_compile) -> None:
    torch_vae = build_reference_vae(THREE_LEVEL_VAE, seed=4)
    config = VAEConfig.from_dict(THREE_LEVEL_VAE)
    params = convert_vae({k: v.numpy() for k, v in torch_vae.state_dict().items()}, config)
    circular(torch_vae)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 6, 10, 4)).astype(np.float32)
    with torch.no_grad():
        post = torch_vae.encode(_nchw(images)).latent_dist
        ref = torch_vae.decode(_nchw(latents)).sample.numpy().transpose(0, 2, 3, 1)
    vae = AutoencoderKL(config, padding_mode="circular")
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))(params, images)
    _close(mean, post.mean.numpy().transpose(0, 2, 3, 1), "circular VAE encode")
    decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(params, latents)
    _close(decoded, ref, "circular VAE decode")


def test_tiling_images_wrap_around(fast_compile) -> None:
    """With every conv circular the whole generation lives on a torus: noise rolled sideways gives the same image
    rolled sideways, the old left/right edge now meeting in the middle like any two neighbouring columns.
    Zero padding breaks this at the borders."""
    import sdjax

    pipe = sdjax.load()
    tiled = pipe.with_tiling()
    assert tiled.tiling and not pipe.tiling and not tiled.with_tiling(False).tiling
    assert tiled.params is pipe.params
    prompts = ["a red circle on a blue background", "a white square on a green background"]
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    shift = 4  # latents: a multiple of the UNet's downsampling (3 levels: 4), 32 pixels
    f = pipe.vae_scale_factor

    def both(p):
        kwargs = dict(num_steps=6, guidance_scale=5.0, height=64, width=96)
        return (p.text_to_image(prompts, latents=noise, **kwargs),
                p.text_to_image(prompts, latents=np.roll(noise, shift, axis=3), **kwargs))

    image, rolled = both(tiled)
    err = float(np.abs(np.roll(image, shift * f, axis=2) - rolled).max())
    assert err < 2e-3, f"tiling: rolled noise gave an image {err:.3g} away from the rolled image"
    image, rolled = both(pipe)
    err = float(np.abs(np.roll(image, shift * f, axis=2) - rolled).max())
    assert err > 5e-2, f"zero padding: rolled noise gave the rolled image within {err:.3g}; the test shows nothing"
