"""diffusers' ControlNetModel in Flax (NHWC): a copy of the UNet's encoder (time embedding, conv_in, down blocks,
mid block: the same modules as :mod:`sdjax.models.unet`) fed with the latents plus an embedding of the control
image, whose every skip connection and mid output goes through a zero-initialised 1x1 conv to become a residual
for the UNet. SD 1.x / 2.x and SDXL ControlNets (``addition_embed_type="text_time"``) share this module.

Submodule names mirror diffusers' keys (``controlnet_cond_embedding/blocks_3``, ``controlnet_down_blocks_7``,
``controlnet_mid_block``) so a diffusers state dict converts by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.config import ConfigError, parse_config
from sdjax.models.unet import DOWN_BLOCK_TYPES, BlockOptions, UNetConfig, down_path, embed_time, mid_path

MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
CHANNEL_ORDERS = ("rgb", "bgr")

_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
}
# Keys a ControlNet with supported values never reads (addition_embed_type="text" only; sample_size is metadata
# some converted configs carry).
_NO_EFFECT = frozenset({"addition_embed_type_num_heads", "sample_size"})


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ControlNetModel config (its defaults)."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None  # diffusers: the heads, else attention_head_dim is
    use_linear_projection: bool = False
    upcast_attention: bool = False  # sdjax always accumulates attention scores in float32
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ControlNetConfig:
        """Parse diffusers' ControlNetModel ``config.json`` (as a dict)."""
        return parse_config(cls, raw, required_values=_REQUIRED_VALUES, ignored=_NO_EFFECT, what="ControlNet")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"unsupported ControlNet config: {key}={getattr(self, key)!r} ({why})")

        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise bad("mid_block_type", f"sdjax supports {MID_BLOCK_TYPES}")
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise bad("controlnet_conditioning_channel_order", f"diffusers supports {CHANNEL_ORDERS}")
        if not isinstance(self.layers_per_block, int):
            raise bad("layers_per_block", "diffusers' ControlNetModel takes one number")
        if not self.conditioning_embedding_out_channels:
            raise bad("conditioning_embedding_out_channels", "needs at least one entry")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise bad("down_block_types", f"{t!r} is not one of {DOWN_BLOCK_TYPES}")
        self.unet_config  # noqa: B018 (the shared blocks' own checks, with their messages)

    @property
    def unet_config(self) -> UNetConfig:
        """The UNet config whose encoder this ControlNet copies (what the shared blocks read)."""
        up = tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                   for t in reversed(self.down_block_types))
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        try:
            return UNetConfig(
                in_channels=self.in_channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
                down_block_types=self.down_block_types, up_block_types=up, block_out_channels=self.block_out_channels,
                layers_per_block=self.layers_per_block, downsample_padding=self.downsample_padding,
                mid_block_scale_factor=self.mid_block_scale_factor, norm_num_groups=self.norm_num_groups,
                norm_eps=self.norm_eps, cross_attention_dim=self.cross_attention_dim,
                transformer_layers_per_block=self.transformer_layers_per_block, attention_head_dim=heads,
                use_linear_projection=self.use_linear_projection, addition_embed_type=self.addition_embed_type,
                addition_time_embed_dim=self.addition_time_embed_dim,
                projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
        except ConfigError as e:
            raise ConfigError(str(e).replace("UNet config", "ControlNet config")) from None

    @property
    def num_down_residuals(self) -> int:
        """How many ``down_block_additional_residuals`` it returns (the UNet's skip connections)."""
        n = len(self.down_block_types)
        return 1 + n * self.layers_per_block + (n - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in -> SiLU -> (conv, SiLU, stride-2 conv, SiLU) per level -> conv_out: image to latent resolution."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(features: int, name: str, stride: int = 1) -> nn.Conv:
            return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           name=name)

        channels = self.block_out_channels
        x = nn.silu(conv(channels[0], "conv_in")(x))
        for i in range(len(channels) - 1):
            x = nn.silu(conv(channels[i], f"blocks_{2 * i}")(x))
            x = nn.silu(conv(channels[i + 1], f"blocks_{2 * i + 1}", stride=2)(x))
        return conv(self.out_channels, "conv_out")(x)


class ControlNetModel(nn.Module):
    """Returns ``(down_block_res_samples, mid_block_res_sample)`` as diffusers' ControlNetModel does, NHWC.

    ``conditioning_scale`` and ``guess_mode`` have diffusers' meaning; the scale may be traced.
    """

    config: ControlNetConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: jax.Array | float = 1.0,
        *,
        guess_mode: bool = False,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """sample (B, h, w, in_channels) latents; controlnet_cond (B, H, W, conditioning_channels) with H, W the
        pixel size (h * 8, w * 8 for SD's ControlNets); SDXL: text_embeds and time_ids as for the UNet."""
        cfg = self.config
        ucfg = cfg.unet_config
        batch = sample.shape[0]
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"ControlNet sample must be NHWC (batch, height, width, {cfg.in_channels}); got "
                             f"{tuple(sample.shape)}")
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[0] != batch \
                or controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"ControlNet controlnet_cond must be NHWC ({batch}, H, W, {cfg.conditioning_channels}); "
                             f"got {tuple(controlnet_cond.shape)}")
        factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        expected = (sample.shape[1] * factor, sample.shape[2] * factor)
        if tuple(controlnet_cond.shape[1:3]) != expected:
            raise ValueError(f"ControlNet controlnet_cond is {tuple(controlnet_cond.shape[1:3])} pixels; latents of "
                             f"{tuple(sample.shape[1:3])} need {expected} ({factor}x)")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch \
                or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"ControlNet encoder_hidden_states must be ({batch}, tokens, {cfg.cross_attention_dim}); "
                             f"got {tuple(encoder_hidden_states.shape)}")
        if (cfg.addition_embed_type == "text_time") != (text_embeds is not None and time_ids is not None):
            raise ValueError("an SDXL ControlNet (addition_embed_type='text_time') needs text_embeds and time_ids; "
                             "others take neither")
        timesteps = jnp.asarray(timesteps, jnp.float32)
        timesteps = jnp.broadcast_to(timesteps.reshape(-1) if timesteps.ndim else timesteps, (batch,))
        opts = BlockOptions(self.dtype, self.attention_impl, self.matmul_dtype)

        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        emb = embed_time(ucfg, timesteps, self.dtype, text_embeds=text_embeds, time_ids=time_ids)
        c0 = cfg.block_out_channels[0]
        x = nn.Conv(c0, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_in")(sample)
        x = x + ControlNetConditioningEmbedding(c0, cfg.conditioning_embedding_out_channels, self.dtype,
                                                name="controlnet_cond_embedding")(controlnet_cond.astype(self.dtype))
        x, skips, _ = down_path(ucfg, x, emb, encoder_hidden_states, opts)
        x = mid_path(ucfg, x, emb, encoder_hidden_states, opts, attention=cfg.mid_block_type == MID_BLOCK_TYPES[0])

        # 1x1 convs as matmuls over channels (the converter squeezes their kernels).
        down = [nn.Dense(s.shape[-1], dtype=self.dtype, name=f"controlnet_down_blocks_{i}")(s)
                for i, s in enumerate(skips)]
        mid = nn.Dense(x.shape[-1], dtype=self.dtype, name="controlnet_mid_block")(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            # diffusers: torch.logspace(-1, 0, n + 1), 0.1 for the first skip up to 1.0 for the mid block.
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * scale
            down = [r * scales[i].astype(r.dtype) for i, r in enumerate(down)]
            mid = mid * scales[-1].astype(mid.dtype)
        else:
            down = [r * scale.astype(r.dtype) for r in down]
            mid = mid * scale.astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [r.mean(axis=(1, 2), keepdims=True) for r in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return tuple(down), mid


def example_inputs(config: ControlNetConfig, batch: int = 1, tokens: int = 1, time_ids: int = 6
                   ) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """Zero inputs of the right shapes for ``init``/``eval_shape``: ``(args, kwargs)``."""
    size = 2 ** (len(config.block_out_channels) - 1)
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    args = (
        jnp.zeros((batch, size, size, config.in_channels)),
        jnp.zeros((batch,)),
        jnp.zeros((batch, tokens, config.cross_attention_dim)),
        jnp.zeros((batch, size * factor, size * factor, config.conditioning_channels)),
    )
    kwargs: dict[str, jax.Array] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        kwargs = {"text_embeds": jnp.zeros((batch, pooled)), "time_ids": jnp.zeros((batch, time_ids))}
    return args, kwargs
