"""The memory estimate: impossible sizes refused at once with a clear message, and the estimate within a small
factor of what XLA itself plans for the compiled UNet and VAE decoder."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest

import sdjax
from sdjax.activation_memory import available_bytes, check_fits, estimate_bytes, unet_bytes, vae_decode_bytes
from sdjax.models.unet import example_inputs
from sdjax.models.vae import AutoencoderKL


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load()


def test_impossible_size_is_refused_at_once_and_small_size_passes(pipe) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"height=100000, width=100000 \(batch 1\) needs about [\d,.]+ GiB"):
        check_fits(pipe, 1, 100000, 100000)
    assert time.perf_counter() - start < 1.0
    assert 0 < check_fits(pipe, 1, 64, 64) < 2**30
    free, where = available_bytes()
    assert free is None or free > 0 and where


def test_budget_and_tiling_change_the_verdict(pipe) -> None:
    need = estimate_bytes(pipe, 2, 512, 768)
    assert check_fits(pipe, 2, 512, 768, available=need) == need
    with pytest.raises(ValueError, match="height=512, width=768 .* or decode the VAE tiled"):
        check_fits(pipe, 2, 512, 768, available=need - 1)
    # Tiled decoding needs one tile's activations, not the whole image's; guidance doubles the UNet's batch.
    assert vae_decode_bytes(pipe, 1, 2048, 2048, tile=64) < vae_decode_bytes(pipe, 1, 2048, 2048) / 4
    assert unet_bytes(pipe, 1, 512, 512, guidance=True) > 1.8 * unet_bytes(pipe, 1, 512, 512, guidance=False)


def test_estimate_is_within_a_small_factor_of_xla(pipe) -> None:
    batch, height, width = 1, 384, 256
    f = pipe.vae_scale_factor
    args, _ = example_inputs(pipe.unet.config, batch=2 * batch, height=height // f, width=width // f, tokens=77)
    unet = jax.jit(lambda p, *a: pipe.unet.apply({"params": p}, *a)).lower(pipe.params["unet"], *args).compile()
    xla_unet = unet.memory_analysis().temp_size_in_bytes
    z = jnp.zeros((batch, height // f, width // f, 4))
    vae = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method=AutoencoderKL.decode)).lower(
        pipe.params["vae"], z).compile()
    analysis = vae.memory_analysis()
    xla_vae = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    for what, ours, xla in (("UNet", unet_bytes(pipe, batch, height, width), xla_unet),
                            ("VAE", vae_decode_bytes(pipe, batch, height, width), xla_vae)):
        assert 0.5 < ours / xla < 4, f"{what}: estimate {ours / 2**20:.1f} MiB vs XLA's {xla / 2**20:.1f} MiB"
