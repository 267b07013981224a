"""Building blocks shared by the UNet and the VAE (NHWC), named after diffusers' modules and keys."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def group_norm(groups: int, eps: float, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    # Two-pass variance as PyTorch computes it: E[x^2]-E[x]^2 loses digits on large activations.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


PADDING_MODES = ("zeros", "circular")


def conv(features: int, kernel: int, dtype: Dtype, name: str | None = None, *, stride: int = 1,
         padding: int | None = None, padding_mode: str = "zeros") -> nn.Conv:
    """A square conv as ``torch.nn.Conv2d(k, stride, padding=k // 2, padding_mode=...)`` builds it.

    ``padding_mode="circular"`` wraps the borders around (A1111's "Tiling": it sets this on every Conv2d), so
    the output tiles seamlessly; a conv without padding is the same either way, as in torch.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r}; choose one of {PADDING_MODES}")
    padding = kernel // 2 if padding is None else padding
    if padding_mode == "circular" and padding:
        # Flax's CIRCULAR pads ((k-1)//2, k//2): torch's symmetric k//2 for the odd kernels used here.
        if padding != kernel // 2 or kernel % 2 == 0:
            raise ValueError(f"circular padding supports odd kernels padded by kernel // 2; got kernel {kernel}, "
                             f"padding {padding}")
        pad: Any = "CIRCULAR"
    else:
        pad = ((padding, padding),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


def conv3x3(features: int, dtype: Dtype, name: str | None = None, stride: int = 1, padding: int = 1,
            padding_mode: str = "zeros") -> nn.Conv:
    return conv(features, 3, dtype, name, stride=stride, padding=padding, padding_mode=padding_mode)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm="default"); ``temb`` is optional (the VAE has none)."""

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    use_temb: bool = True
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1", padding_mode=self.padding_mode)(h)
        if self.use_temb:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.groups_out or self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2", padding_mode=self.padding_mode)(h)
        if x.shape[-1] != self.out_channels:
            # A 1x1 conv in PyTorch; a matmul over channels is the same thing in NHWC and faster on CPU.
            x = nn.Dense(self.out_channels, dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor if self.output_scale_factor != 1.0 else x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE's variant: pad right/bottom by one, then no padding."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            # diffusers' F.pad(value=0): zeros whatever the conv's padding_mode (A1111's tiling keeps it too).
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv3x3(self.out_channels, self.dtype, "conv", stride=2, padding=self.padding,
                       padding_mode=self.padding_mode)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling like torch's ``F.interpolate(mode="nearest")``: 2x, or to ``size``."""
    if size is None or size == (2 * x.shape[1], 2 * x.shape[2]):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
    cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        return conv3x3(self.out_channels, self.dtype, "conv", padding_mode=self.padding_mode)(upsample_nearest(x, size))


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: sinusoidal features of (possibly fractional) timesteps."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2 (optional ``cond_proj`` for LCM)."""

    out_features: int
    cond_proj: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(condition)
        x = nn.silu(nn.Dense(self.out_features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.out_features, dtype=self.dtype, name="linear_2")(x)
