"""diffusers' T2IAdapter in Flax (NHWC): ``full_adapter`` (SD 1.x / 2.x), ``full_adapter_xl`` (SDXL) and
``light_adapter``. Pixel-unshuffle the condition image to latent-ish resolution, then a stack of small resnet
blocks whose outputs are the UNet's ``down_intrablock_additional_residuals``.

Names mirror diffusers' keys (``adapter/conv_in``, ``adapter/body_1/in_conv``, ``adapter/body_0/resnets_1/block2``);
1x1 convs are Dense layers (the converter squeezes their kernels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.config import ConfigError, parse_config

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers' T2IAdapter config (its defaults)."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"unsupported T2IAdapter config: adapter_type={self.adapter_type!r} (diffusers "
                              f"supports {ADAPTER_TYPES})")
        if self.adapter_type == "full_adapter_xl" and len(self.channels) < 3:
            raise ConfigError("unsupported T2IAdapter config: full_adapter_xl needs at least 3 channels entries")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> T2IAdapterConfig:
        return parse_config(cls, raw, what="T2IAdapter")

    @property
    def total_downscale_factor(self) -> int:
        """How much smaller than the input image its first feature is (diffusers' ``total_downscale_factor``
        is that of the last feature; the input must be a multiple of this one)."""
        return self.downscale_factor


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """torch's PixelUnshuffle in NHWC: output channel ``c * f * f + i * f + j`` holds pixel (i, j) of each block."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"T2I-Adapter input of {h}x{w} pixels is not a multiple of its downscale factor {factor}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """torch's AvgPool2d(2, stride=2, ceil_mode=True): a window cut by the edge averages only what it covers."""
    h, w = x.shape[1:3]
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    total = jnp.pad(x, pad)
    count = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), pad)

    def window_sum(y: jax.Array) -> jax.Array:
        return y.reshape(y.shape[0], y.shape[1] // 2, 2, y.shape[2] // 2, 2, y.shape[3]).sum(axis=(2, 4))
    return window_sum(total) / window_sum(count)


def _conv3(features: int, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class AdapterResnetBlock(nn.Module):
    """conv3x3 -> ReLU -> conv (1x1 in the full adapter, 3x3 in the light one) -> + x."""

    channels: int
    light: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(_conv3(self.channels, self.dtype, "block1")(x))
        if self.light:
            h = _conv3(self.channels, self.dtype, "block2")(h)
        else:
            h = nn.Dense(self.channels, dtype=self.dtype, name="block2")(h)
        return h + x


class AdapterBlock(nn.Module):
    """Full adapter block: (avg-pool), (1x1 in_conv when the width changes), resnets."""

    in_channels: int
    out_channels: int
    num_res_blocks: int
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.down:
            x = avg_pool_ceil(x)
        if self.in_channels != self.out_channels:
            x = nn.Dense(self.out_channels, dtype=self.dtype, name="in_conv")(x)
        for i in range(self.num_res_blocks):
            x = AdapterResnetBlock(self.out_channels, dtype=self.dtype, name=f"resnets_{i}")(x)
        return x


class LightAdapterBlock(nn.Module):
    """Light adapter block: (avg-pool), 1x1 in_conv to a quarter width, light resnets, 1x1 out_conv."""

    out_channels: int
    num_res_blocks: int
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.down:
            x = avg_pool_ceil(x)
        mid = self.out_channels // 4
        x = nn.Dense(mid, dtype=self.dtype, name="in_conv")(x)
        for i in range(self.num_res_blocks):
            x = AdapterResnetBlock(mid, light=True, dtype=self.dtype, name=f"resnets_{i}")(x)
        return nn.Dense(self.out_channels, dtype=self.dtype, name="out_conv")(x)


class _Adapter(nn.Module):
    config: T2IAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        cfg, ch, n = self.config, self.config.channels, self.config.num_res_blocks
        x = pixel_unshuffle(x, cfg.downscale_factor)
        if cfg.adapter_type == "light_adapter":
            blocks = [LightAdapterBlock(ch[0], n, dtype=self.dtype, name="body_0")]
            blocks += [LightAdapterBlock(ch[i + 1], n, down=True, dtype=self.dtype, name=f"body_{i + 1}")
                       for i in range(len(ch) - 1)]
            blocks.append(LightAdapterBlock(ch[-1], n, down=True, dtype=self.dtype, name=f"body_{len(ch)}"))
        else:
            x = _conv3(ch[0], self.dtype, "conv_in")(x)
            if cfg.adapter_type == "full_adapter":
                specs = [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True) for i in range(1, len(ch))]
            else:  # full_adapter_xl: the width changes at block 1, the only downsampling is at block 2
                specs = [(ch[i - 1], ch[i], i == 2) if i in (1, 2) else (ch[i], ch[i], False) for i in range(len(ch))]
            blocks = [AdapterBlock(a, b, n, down=d, dtype=self.dtype, name=f"body_{i}")
                      for i, (a, b, d) in enumerate(specs)]
        features = []
        for block in blocks:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """Condition image (B, H, W, in_channels) in [0, 1] -> list of features (the UNet's intrablock residuals)."""

    config: T2IAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"T2I-Adapter input must be NHWC (batch, H, W, {self.config.in_channels}); got "
                             f"{tuple(x.shape)}")
        return _Adapter(self.config, self.dtype, name="adapter")(x.astype(self.dtype))
