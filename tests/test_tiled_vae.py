"""Tiled VAE decode/encode: the same tiles and blends as diffusers' tiled_decode / _tiled_encode, and close to
an untiled decode on a trained VAE."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sdjax.convert.vae import convert_vae
from sdjax.models.vae import AutoencoderKL, VAEConfig, scale_latents, unscale_latents
from sdjax.tiled_vae import decode_latents, decode_tiled, default_tile, encode_pixels, encode_tiled, should_tile
from tests.reference.vae_configs import SD_VAE, build_reference_vae

TILE = 8  # latents: a 21x30 latent image needs 4x5 tiles of four different shapes (edge tiles are cut short)


def _close(actual, ref, what: str) -> None:
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    err = float(np.abs(actual - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"
    assert float(ref.std()) > 1e-2


def test_tiled_decode_and_encode_match_diffusers_tiling(fast_compile) -> None:
    torch_vae = build_reference_vae(SD_VAE, seed=3)
    config = VAEConfig.from_dict(SD_VAE)
    params = convert_vae({k: v.numpy() for k, v in torch_vae.state_dict().items()}, config)
    vae = AutoencoderKL(config)
    f = config.downsample_factor
    torch_vae.enable_tiling()
    torch_vae.tile_latent_min_size, torch_vae.tile_sample_min_size, torch_vae.tile_overlap_factor = TILE, TILE * f, 0.25

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 21, 30, 4)).astype(np.float32)
    images = rng.uniform(-1, 1, size=(2, 21 * f, 30 * f, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy()
        post = torch_vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
    decoded = decode_tiled(vae, params, latents, tile=TILE, overlap=0.25)
    _close(decoded, ref.transpose(0, 2, 3, 1), "tiled decode")
    mean, logvar = encode_tiled(vae, params, images, tile=TILE, overlap=0.25)
    _close(mean, post.mean.numpy().transpose(0, 2, 3, 1), "tiled encode mean")
    _close(logvar, post.logvar.numpy().transpose(0, 2, 3, 1), "tiled encode logvar")

    # The tiles do differ from one whole-image pass (else this test would not show the tiling happened).
    untiled = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(params, latents)
    assert float(np.abs(np.asarray(untiled) - np.asarray(decoded)).max()) > 1e-2


def test_tiled_decode_is_close_to_untiled_on_the_trained_default_vae(fast_compile) -> None:
    import sdjax
    from sdjax.data.shapes import make_batch

    pipe = sdjax.load()
    vae, params = pipe.vae, pipe.params["vae"]
    # Twelve in-domain 64x64 images as one 192x256 mosaic: 24x32 latents, 2x3 tiles of 16 latents.
    mosaic = make_batch(0, 12).images.reshape(3, 4, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(1, 192, 256, 3)
    scaled = encode_pixels(vae, params, mosaic, threshold=None)  # the posterior mean, in the sampler's scale
    untiled = np.asarray(decode_latents(vae, params, scaled, threshold=None))
    tiled = np.asarray(decode_latents(vae, params, scaled, threshold=0, tile=16))
    assert tiled.shape == untiled.shape == mosaic.shape
    # Per-tile group norm and attention make the tiles differ from one pass (diffusers' tiling too; measured
    # max 0.62 at shape edges), but on average the blended tiles give the untiled image.
    assert float(np.abs(tiled - untiled).mean()) < 1e-2

    # decode_latents / encode_pixels: unscale + decode_tiled + clip, and encode_tiled + scale; the default
    # threshold leaves this size untiled.
    latents = unscale_latents(scaled, vae.config)
    direct = np.clip(decode_tiled(vae, params, latents, tile=16) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(tiled, direct, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(decode_latents(vae, params, scaled)), untiled)
    mean, _ = encode_tiled(vae, params, mosaic * 2 - 1, tile=16)
    by_tiles = encode_pixels(vae, params, mosaic, threshold=0, tile=16)
    np.testing.assert_allclose(np.asarray(by_tiles), np.asarray(scale_latents(mean, vae.config)), atol=1e-6)
    assert float(np.abs(np.asarray(mean) - np.asarray(latents)).max()) > 1e-2  # the tiled encode was tiled


def test_should_tile_and_defaults() -> None:
    assert not should_tile(1024, 1024)  # SDXL's native size decodes as diffusers does
    assert not should_tile(2048, 512)
    assert should_tile(2048, 2048)
    assert should_tile(64, 64, threshold=0) and not should_tile(4096, 4096, threshold=None)
    four_levels = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    assert default_tile(VAEConfig(block_out_channels=(8,) * 4, norm_num_groups=4, sample_size=512, **four_levels)) == 64


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tile": 10, "overlap": 0.25}, "whole number"),
    ({"tile": 8, "overlap": 0.75}, "overlap=0.75"),
    ({"tile": 0}, "tile=0"),
])
def test_tiled_decode_refuses_bad_tiles(kwargs, message) -> None:
    vae = AutoencoderKL(VAEConfig.from_dict(SD_VAE))
    with pytest.raises(ValueError, match=message):
        decode_tiled(vae, {}, np.zeros((1, 16, 16, 4), np.float32), **kwargs)
