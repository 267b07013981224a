"""AutoencoderKL parity with diffusers, conversion, latent sampling and scaling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.convert.vae import convert_vae, vae_param_shapes
from sdjax.convert.weights import WeightMismatchError
from sdjax.models.config import ConfigError
from sdjax.models.vae import AutoencoderKL, VAEConfig, sample_latent, scale_latents, unscale_latents
from tests.reference.vae_configs import SD_VAE, THREE_LEVEL_VAE, VAE_CONFIGS, build_reference_vae

# Non-square pixel size for every config (one compile per config: the other tests reuse these shapes).
HEIGHT, WIDTH = 32, 48
BATCH = 3


def assert_close(actual, ref, what: str) -> None:
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(actual - ref).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def state_dict_np(vae: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in vae.state_dict().items()}


@functools.cache
def reference(name: str):
    """(torch VAE, VAEConfig, params, jitted encode, jitted decode) for one tiny config, built once."""
    raw = VAE_CONFIGS[name]
    torch_vae = build_reference_vae(raw, seed=len(name))
    config = VAEConfig.from_dict(raw)
    params = convert_vae(state_dict_np(torch_vae), config)
    model = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    return torch_vae, config, params, encode, decode


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_encode_decode_parity(name: str) -> None:
    torch_vae, config, params, encode, decode = reference(name)
    f = config.downsample_factor
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (BATCH, HEIGHT, WIDTH, config.in_channels)).astype(np.float32)
    latents = rng.normal(size=(BATCH, HEIGHT // f, WIDTH // f, config.latent_channels)).astype(np.float32)

    with torch.no_grad():
        posterior = torch_vae.encode(nchw(images)).latent_dist
        ref_images = torch_vae.decode(nchw(latents)).sample
    mean, logvar = encode(params, images)
    assert_close(mean, nhwc(posterior.mean), f"{name} encode mean")
    assert_close(logvar, nhwc(posterior.logvar), f"{name} encode logvar")
    decoded = decode(params, latents)
    assert_close(decoded, nhwc(ref_images), f"{name} decode")
    # The reference must be non-trivial for the comparison to mean anything.
    assert float(np.std(nhwc(ref_images))) > 1e-2 and float(np.std(nhwc(posterior.mean))) > 1e-2


def test_decode_long_sequence_uses_blockwise_attention_at_parity() -> None:
    # 32x40 latents = 1280 tokens: the mid-block attention takes the blockwise path with a padded key block.
    torch_vae, config, params, _, decode = reference("sd")
    latents = np.random.default_rng(2).normal(size=(1, 32, 40, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        ref = torch_vae.decode(nchw(latents)).sample
    assert_close(decode(params, latents), nhwc(ref), "decode 1280 tokens")


def test_logvar_is_clamped_like_diffusers() -> None:
    torch_vae, config, params, encode, _ = reference("sd")
    # Push the logvar half of quant_conv's bias far out so both clamp bounds bind.
    c = config.latent_channels
    bias = np.array(params["quant_conv"]["bias"])
    bias[c:] = np.where(np.arange(c) % 2, 1e3, -1e3)
    params = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
    images = np.random.default_rng(3).uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
    _, logvar = encode(params, images)
    assert float(logvar.min()) == -30.0 and float(logvar.max()) == 20.0
    sd = state_dict_np(torch_vae)
    sd["quant_conv.bias"] = bias
    ref = build_reference_vae(SD_VAE)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    with torch.no_grad():
        assert_close(logvar, nhwc(ref.encode(nchw(images)).latent_dist.logvar), "clamped logvar")


def test_downsample_factor_sets_latent_size() -> None:
    _, config, params, encode, decode = reference("three_level")
    assert config.downsample_factor == 4
    images = np.full((BATCH, 32, 48, 3), 0.3, np.float32)
    mean, logvar = encode(params, images)
    assert mean.shape == logvar.shape == (BATCH, 8, 12, config.latent_channels)
    assert decode(params, np.asarray(mean)).shape == (BATCH, 32, 48, 3)
    assert VAEConfig.from_dict(SD_VAE).downsample_factor == 2
    assert VAEConfig().downsample_factor == 1
    assert VAEConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4).downsample_factor == 8


def test_bad_input_shapes_are_named() -> None:
    _, config, params, _, _ = reference("three_level")
    model = AutoencoderKL(config)
    with pytest.raises(ValueError, match="multiples of the downsample factor 4"):
        model.apply({"params": params}, jnp.zeros((1, 30, 48, 3)), method=AutoencoderKL.encode)
    with pytest.raises(ValueError, match=r"NHWC.*got shape \(1, 4, 8, 8\)"):
        model.apply({"params": params}, jnp.zeros((1, 4, 8, 8)), method=AutoencoderKL.decode)


def test_sample_latent_matches_posterior_structure() -> None:
    torch_vae, _, params, encode, _ = reference("sd")
    images = np.random.default_rng(4).uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
    mean, logvar = encode(params, images)
    sample = jax.jit(sample_latent)
    key = jax.random.PRNGKey(7)
    z = sample(mean, logvar, key)
    noise = np.asarray(jax.random.normal(key, mean.shape))
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(images)).latent_dist
    # diffusers' DiagonalGaussianDistribution.sample is mean + std * noise; use the same noise.
    assert_close(z, nhwc(posterior.mean) + nhwc(posterior.std) * noise, "sampled latent")
    assert np.array_equal(np.asarray(z), np.asarray(sample(mean, logvar, key)))
    assert not np.allclose(np.asarray(z), np.asarray(sample(mean, logvar, jax.random.PRNGKey(8))))
    # Standardised draws are N(0, 1).
    many_mean, many_logvar = jnp.tile(mean, (64, 1, 1, 1)), jnp.tile(logvar, (64, 1, 1, 1))
    standard = np.asarray((sample(many_mean, many_logvar, key) - many_mean) / jnp.exp(0.5 * many_logvar))
    assert abs(standard.mean()) < 0.02 and abs(standard.std() - 1) < 0.02


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_scale_unscale_match_pipeline_formulas(name: str) -> None:
    config = VAEConfig.from_dict(VAE_CONFIGS[name])
    z = np.random.default_rng(5).normal(size=(2, 4, 6, config.latent_channels)).astype(np.float32)
    zt = torch.from_numpy(z)
    if config.shift_factor is not None:  # StableDiffusion3Pipeline / img2img
        encoded = (zt - config.shift_factor) * config.scaling_factor
        decoded = (zt / config.scaling_factor) + config.shift_factor
    else:  # StableDiffusionPipeline / StableDiffusionXLPipeline
        encoded = config.scaling_factor * zt
        decoded = zt / config.scaling_factor
    np.testing.assert_allclose(scale_latents(z, config), encoded.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(unscale_latents(z, config), decoded.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, config), config), z, rtol=1e-5, atol=1e-5)


def test_scale_with_latents_mean_std_matches_sdxl_pipeline() -> None:
    mean, std = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 0.7, 1.3]
    config = VAEConfig.from_dict({**SD_VAE, "latents_mean": mean, "latents_std": std})
    z = np.random.default_rng(6).normal(size=(2, 3, 5, 4)).astype(np.float32)
    zt = torch.from_numpy(z.transpose(0, 3, 1, 2))
    mt, st = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    # StableDiffusionXLImg2ImgPipeline.prepare_latents and StableDiffusionXLPipeline.__call__.
    encoded = (zt - mt) * config.scaling_factor / st
    decoded = zt * st / config.scaling_factor + mt
    np.testing.assert_allclose(scale_latents(z, config), nhwc(encoded), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(unscale_latents(z, config), nhwc(decoded), rtol=1e-6, atol=1e-6)


def test_legacy_attention_key_names_load() -> None:
    torch_vae, config, params, _, _ = reference("sd")
    legacy = {}
    for key, value in state_dict_np(torch_vae).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    converted = convert_vae(legacy, config)
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_weight_mismatches_are_named() -> None:
    torch_vae, config, _, _, _ = reference("sd")
    sd = state_dict_np(torch_vae)
    del sd["decoder.mid_block.attentions.0.to_k.weight"]
    sd["encoder.extra_layer.weight"] = np.zeros(3, np.float32)
    sd["encoder.conv_out.weight"] = np.zeros((9, 32, 3, 3), np.float32)
    with pytest.raises(WeightMismatchError) as info:
        convert_vae(sd, config)
    message = str(info.value)
    assert "decoder/mid_block/attentions_0/to_k/kernel" in message
    assert "encoder.extra_layer.weight" in message
    assert "encoder.conv_out.weight" in message and "(9, 32, 3, 3)" in message
    # A checkpoint for another config (16 latent channels) does not load into this one.
    with pytest.raises(WeightMismatchError, match="quant_conv"):
        convert_vae(sd, VAEConfig.from_dict(VAE_CONFIGS["shift"]))


def test_convert_casts_dtype_and_bf16_params_run_in_float32() -> None:
    torch_vae, config, params, _, decode = reference("sdxl")
    bf16 = convert_vae(state_dict_np(torch_vae), config, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    assert config.force_upcast
    latents = np.random.default_rng(9).normal(size=(BATCH, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
    # `decode` is a float32 AutoencoderKL; the caller casts the bf16 params up, as the pipeline does.
    upcast = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), bf16)
    out = decode(upcast, latents)
    ref = decode(params, latents)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    # bf16 weights (8 mantissa bits) move the output by roughly 1%, not more.
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_param_shapes_cover_the_state_dict() -> None:
    torch_vae, config, _, _, _ = reference("three_level")
    shapes = vae_param_shapes(config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n_params == sum(p.numel() for p in torch_vae.parameters())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"norm_num_groups": 5}, "norm_num_groups"),
        ({"latents_mean": [0.0] * 4}, "latents_std"),
        ({"shift_factor": 0.1, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "shift_factor"),
        ({"norm_type": "spatial"}, "norm_type"),
    ],
)
def test_unsupported_config_is_named(change: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        VAEConfig.from_dict({**SD_VAE, **change})


def test_config_parses_a_full_diffusers_config_and_keeps_defaults() -> None:
    from diffusers import AutoencoderKL as TorchVAE

    raw = dict(TorchVAE(**{k: v for k, v in THREE_LEVEL_VAE.items() if not k.startswith("_")}).config)
    config = VAEConfig.from_dict(raw)
    assert config.block_out_channels == (8, 16, 16) and config.layers_per_block == 2
    assert hash(config) == hash(VAEConfig.from_dict(raw))
    # Keys absent from old config.json files take diffusers' defaults.
    old = VAEConfig.from_dict({k: v for k, v in SD_VAE.items() if k not in ("scaling_factor", "sample_size")})
    assert old.scaling_factor == 0.18215 and old.force_upcast and old.shift_factor is None
