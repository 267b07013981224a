"""diffusers' AutoencoderKL (the SD / SDXL / SD3-style VAE) in Flax, NHWC.

Module and parameter names follow the diffusers state dict (``encoder/down_blocks_0/resnets_1/conv1``,
``decoder/mid_block/attentions_0/to_q``, ``quant_conv``) so ``convert/vae.py`` is a mechanical mapping.

``encode`` returns the posterior's ``(mean, logvar)``; ``decode`` takes *unscaled* latents. Moving between the
VAE's latent space and the diffusion model's (scaling factor, SD3 shift, SDXL per-channel mean/std) is done by
:func:`scale_latents` / :func:`unscale_latents`, exactly as the diffusers pipelines do it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.config import ConfigError, parse_config
from sdjax.models.attention import attention
from sdjax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3, group_norm

Dtype = Any

# diffusers hard-codes these for the VAE's Encoder/Decoder.
_EPS = 1e-6
# DiagonalGaussianDistribution clamps logvar to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``AutoencoderKL`` config.json (defaults are diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32  # only used by diffusers' tiling; kept for reference
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # SD3 / Flux style: z_model = (z - shift) * scale
    latents_mean: tuple[float, ...] | None = None  # SDXL-pipeline style per-channel statistics
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # the pipeline decodes in float32 when set
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        levels = len(self.block_out_channels)
        if levels == 0:
            problems.append("block_out_channels is empty")
        for key in ("down_block_types", "up_block_types"):
            types = getattr(self, key)
            supported = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
            bad = sorted({t for t in types if t != supported})
            if bad:
                problems.append(f"{key} contains {bad} (sdjax supports only {supported!r})")
            if len(types) != levels:
                problems.append(f"{key} has {len(types)} entries but block_out_channels has {levels}")
        bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_groups:
            problems.append(f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels {bad_groups}")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block={self.layers_per_block} (must be >= 1)")
        if not self.scaling_factor:
            problems.append("scaling_factor is zero")
        stats = (self.latents_mean is None, self.latents_std is None)
        if stats[0] != stats[1]:
            problems.append("latents_mean and latents_std must be given together")
        elif self.latents_mean is not None:
            for key in ("latents_mean", "latents_std"):
                if len(getattr(self, key)) != self.latent_channels:
                    problems.append(f"{key} has {len(getattr(self, key))} entries, latent_channels is "
                                    f"{self.latent_channels}")
            if self.shift_factor is not None:
                # No diffusers pipeline defines how the two combine; refuse rather than guess.
                problems.append("shift_factor and latents_mean/latents_std are both set")
        if problems:
            raise ConfigError("unsupported AutoencoderKL config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VAEConfig:
        return parse_config(cls, raw, required_values={"act_fn": ("silu",)}, what="AutoencoderKL")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
    """diffusers' ``Attention`` as the VAE mid block uses it: group norm, one head over all H*W tokens, residual."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(self.groups, _EPS, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(tokens)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(tokens)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(tokens)
        out = attention(q, k, v).reshape(b, h, w, c)
        return x + nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D without a time embedding: resnet, (attention), resnet."""

    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, eps=_EPS, use_temb=False, dtype=self.dtype, padding_mode=self.padding_mode,
                          name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, eps=_EPS, use_temb=False, dtype=self.dtype,
                             padding_mode=self.padding_mode, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    groups: int
    num_layers: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, eps=_EPS, use_temb=False, dtype=self.dtype,
                              padding_mode=self.padding_mode, name=f"resnets_{j}")(x)
        if self.add_downsample:
            # padding=0: diffusers' VAE pads right/bottom by one, then convolves without padding.
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, padding_mode=self.padding_mode,
                             name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    groups: int
    num_layers: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, eps=_EPS, use_temb=False, dtype=self.dtype,
                              padding_mode=self.padding_mode, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, padding_mode=self.padding_mode, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        groups = cfg.norm_num_groups
        pm = self.padding_mode
        x = conv3x3(cfg.block_out_channels[0], self.dtype, "conv_in", padding_mode=pm)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock2D(channels, groups, cfg.layers_per_block, i < last, self.dtype, pm,
                                   name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(groups, cfg.mid_block_add_attention, self.dtype, pm, name="mid_block")(x)
        x = nn.silu(group_norm(groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv3x3(2 * cfg.latent_channels, self.dtype, "conv_out", padding_mode=pm)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        groups = cfg.norm_num_groups
        reversed_channels = cfg.block_out_channels[::-1]
        pm = self.padding_mode
        x = conv3x3(reversed_channels[0], self.dtype, "conv_in", padding_mode=pm)(z)
        x = VAEMidBlock(groups, cfg.mid_block_add_attention, self.dtype, pm, name="mid_block")(x)
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            x = UpDecoderBlock2D(channels, groups, cfg.layers_per_block + 1, i < last, self.dtype, pm,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv3x3(cfg.out_channels, self.dtype, "conv_out", padding_mode=pm)(x)


class AutoencoderKL(nn.Module):
    """``encode(images) -> (mean, logvar)`` and ``decode(latents) -> images``; NHWC, images in [-1, 1].

    Outputs are float32 whatever ``dtype`` computes in (latent statistics feed float32 sampler arithmetic).
    Params of another dtype (e.g. bf16) are cast to ``dtype`` by the layers, so a float32 VAE runs bf16 weights.
    ``padding_mode="circular"``: every padded conv wraps around (seamless textures, A1111's "Tiling").
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.padding_mode)
        self.decoder = Decoder(cfg, self.dtype, self.padding_mode)
        # 1x1 convs in PyTorch: a matmul over channels in NHWC.
        if cfg.use_quant_conv:
            self.quant_conv = nn.Dense(2 * cfg.latent_channels, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Dense(cfg.latent_channels, dtype=self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``(B, H, W, in_channels)`` in [-1, 1] -> posterior ``(mean, logvar)``, each
        ``(B, H/f, W/f, latent_channels)`` with ``f = config.downsample_factor``."""
        return posterior(self.encode_moments(images))

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """The encoder's raw output ``(B, H/f, W/f, 2 * latent_channels)``, float32: mean and unclipped logvar
        (what tiled encoding blends, as diffusers does, before :func:`posterior` splits and clips it)."""
        cfg = self.config
        _check_input(images, cfg.in_channels, cfg.downsample_factor, "images")
        h = self.encoder(images.astype(self.dtype))
        if cfg.use_quant_conv:
            h = self.quant_conv(h)
        return h.astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``(B, h, w, latent_channels)`` -> images ``(B, h*f, w*f, out_channels)``."""
        cfg = self.config
        _check_input(latents, cfg.latent_channels, 1, "latents")
        z = latents.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruct ``images`` through the posterior mean (also what ``init`` traces)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def _check_input(x: jax.Array, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"VAE {what} must be NHWC (batch, height, width, {channels}); got shape {x.shape}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"VAE {what} height and width must be multiples of the downsample factor {multiple}; "
                         f"got {x.shape[1]}x{x.shape[2]}")


def posterior(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Raw encoder moments -> ``(mean, logvar)`` with logvar clipped as DiagonalGaussianDistribution does."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the posterior: ``mean + exp(0.5 * logvar) * N(0, 1)``."""
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


def _channel_stats(config: VAEConfig, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray(config.latents_mean, like.dtype)
    std = jnp.asarray(config.latents_std, like.dtype)
    return mean, std  # NHWC: channels last, so they broadcast as they are


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> diffusion-model latents, as diffusers' pipelines do after ``encode``.

    SD/SDXL: ``z * scaling_factor``; SD3/Flux: ``(z - shift_factor) * scaling_factor``; with per-channel
    ``latents_mean``/``latents_std`` (SDXL pipelines): ``(z - mean) * scaling_factor / std``.
    """
    if config.latents_mean is not None:
        mean, std = _channel_stats(config, z)
        return (z - mean) * config.scaling_factor / std
    if config.shift_factor is not None:
        return (z - config.shift_factor) * config.scaling_factor
    return config.scaling_factor * z


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Diffusion-model latents -> VAE latents (the inverse of :func:`scale_latents`), before ``decode``."""
    if config.latents_mean is not None:
        mean, std = _channel_stats(config, z)
        return z * std / config.scaling_factor + mean
    if config.shift_factor is not None:
        return z / config.scaling_factor + config.shift_factor
    return z / config.scaling_factor
