"""diffusers' UNet2DConditionModel in Flax (NHWC): one module for SD 1.x, SD 2.x, SDXL base/refiner, inpainting
and LCM UNets, parsed from the same config.json.

Submodule names mirror the diffusers state-dict keys (``conv_in``, ``time_embedding/linear_1``,
``down_blocks_0/resnets_1``, ``down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q``, ``mid_block``,
``up_blocks_2/upsamplers_0``, ``conv_norm_out``, ``conv_out``), so a checkpoint converts by name
(``sdjax.convert.unet``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.config import ConfigError, parse_config
from sdjax.models.hypernetwork import HypernetworkSpec
from sdjax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)
from sdjax.models.transformer import IPAdapterContext, Transformer2DModel

Dtype = jnp.dtype

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys whose value must be one sdjax implements (diffusers' defaults; the SD/SDXL/LCM checkpoints use them).
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    # diffusers 0.42 itself refuses a non-null num_attention_heads (its historical naming bug): attention_head_dim
    # is read as the number of heads.
    "num_attention_heads": (None,),
    "act_fn": ("silu", "swish"),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
}

# Keys that diffusers' CrossAttn/Down/Up/Mid-CrossAttn blocks never read, so any value gives the same model.
_NO_EFFECT = frozenset({
    "resnet_skip_time_act",  # only Simple*/ResnetDownsample blocks
    "resnet_out_scale_factor",  # only Simple*/ResnetDownsample/ResnetUpsample blocks
    "mid_block_only_cross_attention",  # only UNetMidBlock2DSimpleCrossAttn
    "addition_embed_type_num_heads",  # only addition_embed_type="text"
    "dropout",  # training only
})


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The parts of diffusers' UNet2DConditionModel config that change the computation (diffusers' defaults)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    # Per down block: one depth, or one per layer (SSD-1B / Segmind Vega); the up blocks then need theirs in
    # reverse_transformer_layers_per_block (per up block, one depth or one per layer), as diffusers.
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # None: no mid block (BK-SDM small / tiny)
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False  # Linear vs 1x1-conv proj_in/out: the same math here
    upcast_attention: bool = False  # sdjax always accumulates attention scores in float32
    only_cross_attention: bool | tuple[bool, ...] = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> UNetConfig:
        """Parse diffusers' UNet2DConditionModel ``config.json`` (as a dict)."""
        return parse_config(cls, raw, required_values=_REQUIRED_VALUES, ignored=_NO_EFFECT, what="UNet")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"unsupported UNet config: {key}={getattr(self, key)!r} ({why})")

        n = len(self.down_block_types)
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise bad("down_block_types", f"{t!r} is not one of {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise bad("up_block_types", f"{t!r} is not one of {UP_BLOCK_TYPES}")
        if len(self.up_block_types) != n:
            raise bad("up_block_types", f"needs {n} entries, one per down block")
        if len(self.block_out_channels) != n:
            raise bad("block_out_channels", f"needs {n} entries, one per down block")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                    "only_cross_attention"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != n:
                raise bad(key, f"needs one value or {n} values, one per down block")
            if key == "transformer_layers_per_block" and isinstance(value, tuple) and any(
                    isinstance(v, tuple) for v in value) and self.reverse_transformer_layers_per_block is None:
                raise bad(key, "per-layer lists need reverse_transformer_layers_per_block for the up blocks")
            if key == "attention_head_dim" and (value is None or None in _per_block(value, n)):
                raise bad(key, "must be set: it is the number of attention heads")
        for i, depth in enumerate(self.transformer_layers):
            if isinstance(depth, tuple) and len(depth) != self.layers[i]:
                raise bad("transformer_layers_per_block", f"block {i} lists {len(depth)} depths for "
                                                          f"{self.layers[i]} layers")
        reverse = self.reverse_transformer_layers_per_block
        if reverse is not None:
            if len(reverse) != n:
                raise bad("reverse_transformer_layers_per_block", f"needs {n} entries, one per up block")
            for i, depth in enumerate(reverse):
                if isinstance(depth, tuple) and len(depth) != self.layers[n - 1 - i] + 1:
                    raise bad("reverse_transformer_layers_per_block",
                              f"up block {i} lists {len(depth)} depths for {self.layers[n - 1 - i] + 1} layers")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise bad("mid_block_type", "sdjax supports 'UNetMidBlock2DCrossAttn' and None")
        if any(_per_block(self.only_cross_attention, n)):
            raise bad("only_cross_attention", "sdjax supports False")
        if not isinstance(self.norm_num_groups, int):
            raise bad("norm_num_groups", "sdjax needs a number of groups")
        if self.conv_in_kernel % 2 == 0:
            raise bad("conv_in_kernel", "must be odd")
        if self.conv_out_kernel % 2 == 0:
            raise bad("conv_out_kernel", "must be odd")
        if self.addition_embed_type not in (None, "text_time"):
            raise bad("addition_embed_type", "sdjax supports None and 'text_time'")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise bad("addition_embed_type",
                      "'text_time' needs addition_time_embed_dim and projection_class_embeddings_input_dim")
        for i, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads, strict=True)):
            if heads < 1 or channels // heads < 1:
                raise bad("attention_head_dim", f"{heads} heads do not fit block {i}'s {channels} channels")

    # Per-block values as diffusers expands them.
    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_block(self.attention_head_dim, self.num_blocks)

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks)

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.num_blocks)

    @property
    def transformer_layers(self) -> tuple[int | tuple[int, ...], ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks)

    def down_depths(self, block: int) -> tuple[int, ...]:
        """Transformer depth of each layer of down block ``block``."""
        return _per_layer(self.transformer_layers[block], self.layers[block])

    def up_depths(self, block: int) -> tuple[int, ...]:
        """Transformer depth of each layer of up block ``block`` (counted from the lowest resolution)."""
        count = self.layers[self.num_blocks - 1 - block] + 1
        if self.reverse_transformer_layers_per_block is not None:
            return _per_layer(self.reverse_transformer_layers_per_block[block], count)
        return _per_layer(self.transformer_layers[self.num_blocks - 1 - block], count)

    @property
    def mid_depth(self) -> int:
        return _per_layer(self.transformer_layers[-1], 1)[0]  # diffusers' mid block reads the first entry

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def num_upsamplers(self) -> int:
        return self.num_blocks - 1


def _per_block(value: Any, n: int) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


def _per_layer(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


class _Block(nn.Module):
    """Fields shared by down, mid and up blocks."""

    out_channels: int
    num_layers: int
    heads: int | None  # None: no attention (DownBlock2D / UpBlock2D)
    transformer_layers: tuple[int, ...] = (1,)  # per layer
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Dtype | None = None
    hypernetworks: tuple[HypernetworkSpec, ...] = ()
    padding_mode: str = "zeros"

    def resnet(self, name: str, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, groups=self.groups, eps=self.eps, output_scale_factor=scale,
                             dtype=self.dtype, padding_mode=self.padding_mode, name=name)

    def transformer(self, name: str, layer: int) -> Transformer2DModel:
        assert self.heads is not None
        return Transformer2DModel(self.heads, self.out_channels // self.heads,
                                  num_layers=self.transformer_layers[layer],
                                  groups=self.groups, dtype=self.dtype, attention_impl=self.attention_impl,
                                  matmul_dtype=self.matmul_dtype, hypernetworks=self.hypernetworks, name=name)


class DownBlock(_Block):
    """CrossAttnDownBlock2D (``heads`` set) or DownBlock2D; returns the output and the skip connections."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: Any,
                 additional_residual: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """``additional_residual`` (T2I-Adapter) joins after the last layer, before the skip and the downsampler."""
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.heads is not None:
                x = self.transformer(f"attentions_{i}", i)(x, context)
            if additional_residual is not None and i == self.num_layers - 1:
                x = x + additional_residual.astype(x.dtype)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             padding_mode=self.padding_mode, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x num_layers."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: Any) -> jax.Array:
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}", i)(x, context)
            x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
        return x


class UpBlock(_Block):
    """CrossAttnUpBlock2D (``heads`` set) or UpBlock2D; consumes one skip connection per layer, last first."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: Any,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.heads is not None:
                x = self.transformer(f"attentions_{i}", i)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, padding_mode=self.padding_mode,
                           name="upsamplers_0")(x, upsample_size)
        return x


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Compute settings every block of a UNet (or of a ControlNet's copy of its encoder) shares."""

    dtype: Any = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Any = None
    hypernetworks: tuple[HypernetworkSpec, ...] = ()
    padding_mode: str = "zeros"


def _block_kwargs(cfg: UNetConfig, i: int, attn: bool, channels: int, opts: BlockOptions,
                  depths: tuple[int, ...]) -> dict[str, Any]:
    """``depths``: the transformer depth of each layer of the block."""
    return dict(out_channels=channels, heads=cfg.heads[i] if attn else None,
                transformer_layers=depths, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                dtype=opts.dtype, attention_impl=opts.attention_impl, matmul_dtype=opts.matmul_dtype,
                hypernetworks=opts.hypernetworks, padding_mode=opts.padding_mode)


# The functions below are the encoder half the UNet and diffusers' ControlNetModel share. They are called inside a
# module's compact ``__call__`` and create their submodules there, under diffusers' names (``time_embedding``,
# ``add_embedding``, ``down_blocks_i``, ``mid_block``), so both models' params keep the checkpoints' layout.

def embed_time(cfg: UNetConfig, timesteps: jax.Array, dtype: Any, *, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None, timestep_cond: jax.Array | None = None) -> jax.Array:
    """Time embedding (+ SDXL's pooled text and size/crop conditioning when ``addition_embed_type="text_time"``)."""
    c0 = cfg.block_out_channels[0]
    t_emb = timestep_embedding(timesteps, c0, flip_sin_to_cos=cfg.flip_sin_to_cos,
                               downscale_freq_shift=cfg.freq_shift).astype(dtype)
    emb = TimestepEmbedding(cfg.time_embed_dim, cond_proj=cfg.time_cond_proj_dim is not None, dtype=dtype,
                            name="time_embedding")(t_emb, timestep_cond)
    if cfg.addition_embed_type == "text_time":
        batch = timesteps.shape[0]
        time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                         flip_sin_to_cos=cfg.flip_sin_to_cos,
                                         downscale_freq_shift=cfg.freq_shift).reshape(batch, -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(dtype)
        emb = emb + TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="add_embedding")(add)
    return emb


def down_path(cfg: UNetConfig, x: jax.Array, emb: jax.Array, context: Any, opts: BlockOptions,
              intrablock: Sequence[jax.Array] = ()) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """The down blocks on ``x`` (conv_in's output): ``(x, skips, unused intrablock residuals)``.

    ``intrablock``: T2I-Adapter features, consumed one per down block in order as diffusers does: inside a
    CrossAttnDownBlock2D after its last (resnet, attention) pair; after a DownBlock2D (whose last skip is the same
    tensor in diffusers' in-place ``sample +=``, so it changes too).
    """
    skips = [x]
    pending = list(intrablock)
    last = cfg.num_blocks - 1
    for i, kind in enumerate(cfg.down_block_types):
        attn = kind == "CrossAttnDownBlock2D"
        extra = pending.pop(0) if pending and attn else None
        x, res = DownBlock(num_layers=cfg.layers[i], add_downsample=i < last,
                           downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}",
                           **_block_kwargs(cfg, i, attn, cfg.block_out_channels[i], opts, cfg.down_depths(i)))(
            x, emb, context, extra)
        if pending and not attn:
            x = x + pending.pop(0).astype(x.dtype)
            res[-1] = x
        skips += res
    return x, skips, pending


def mid_path(cfg: UNetConfig, x: jax.Array, emb: jax.Array, context: Any, opts: BlockOptions,
             attention: bool = True) -> jax.Array:
    """``mid_block``: UNetMidBlock2DCrossAttn, or (``attention=False``) a UNetMidBlock2D with no attention."""
    last = cfg.num_blocks - 1
    return MidBlock(num_layers=1 if attention else 0, output_scale_factor=cfg.mid_block_scale_factor,
                    name="mid_block",
                    **_block_kwargs(cfg, last, True, cfg.block_out_channels[-1], opts, (cfg.mid_depth,)))(
        x, emb, context)


class UNet2DConditionModel(nn.Module):
    """The conditional UNet.

    ``dtype``: compute dtype (params keep theirs). ``attention_impl`` forces one implementation of
    :func:`sdjax.models.attention.attention` everywhere (None: chosen per call by sequence length).
    ``matmul_dtype`` (opt-in, e.g. ``jnp.bfloat16``): the transformer blocks' matmuls and attention take inputs in
    that dtype and accumulate in float32 (faster on CPU; bf16-level accuracy, not fp32 parity).
    ``hypernetworks``: A1111 hypernetworks in every attention layer (``sdjax.convert.hypernetwork``; their
    params sit under each attention's ``hypernetwork_<i>``).
    ``padding_mode="circular"``: every padded conv wraps around (seamless textures, A1111's "Tiling").
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Dtype | None = None
    hypernetworks: tuple[HypernetworkSpec, ...] = ()
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        *,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        timestep_cond: jax.Array | None = None,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        down_intrablock_additional_residuals: Sequence[jax.Array] | None = None,
        ip_adapter_tokens: Sequence[jax.Array] | None = None,
        ip_adapter_scales: jax.Array | Sequence[float] | None = None,
    ) -> jax.Array:
        """sample (B, H, W, in_channels) NHWC; timesteps (B,) or scalar, may be fractional; encoder_hidden_states
        (B, L, cross_attention_dim); SDXL: text_embeds (B, pooled), time_ids (B, 6 or 5); LCM: timestep_cond
        (B, time_cond_proj_dim). Returns (B, H, W, out_channels).

        ControlNet (diffusers' names and meaning): ``down_block_additional_residuals`` (one per skip connection, NHWC)
        are added to the skips and ``mid_block_additional_residual`` to the mid block's output. T2I-Adapter:
        ``down_intrablock_additional_residuals`` (see :func:`down_path`; a leftover one of the mid block's shape is
        added to its output). IP-Adapter: ``ip_adapter_tokens`` (one (B, T, C) or (B, images, T, C) array per
        adapter, its image projection's output) with ``ip_adapter_scales`` (one per adapter) feed every
        cross-attention's ``to_k_ip_j``/``to_v_ip_j``.
        """
        cfg = self.config
        timesteps = self._check_inputs(sample, timesteps, encoder_hidden_states, text_embeds, time_ids,
                                       timestep_cond)
        _check_residuals(sample.shape[0], down_block_additional_residuals, mid_block_additional_residual)
        opts = BlockOptions(self.dtype, self.attention_impl, self.matmul_dtype, self.hypernetworks, self.padding_mode)
        context = ip_adapter_context(encoder_hidden_states, ip_adapter_tokens, ip_adapter_scales)

        # 1. time (+ SDXL's pooled text and size/crop conditioning)
        emb = embed_time(cfg, timesteps, self.dtype, text_embeds=text_embeds, time_ids=time_ids,
                         timestep_cond=timestep_cond)

        # 2. in
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in",
                 padding_mode=self.padding_mode)(sample)

        # 3. down (+ T2I-Adapter features inside, ControlNet residuals on the skips)
        x, skips, pending = down_path(cfg, x, emb, context, opts, down_intrablock_additional_residuals or ())
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"arrays; this UNet has {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals, strict=True)]

        # 4. mid
        if cfg.mid_block_type is not None:  # absent in some distilled UNets
            x = mid_path(cfg, x, emb, context, opts)
        if pending and pending[0].shape == x.shape:  # T2I-Adapter-XL's last feature
            x = x + pending.pop(0).astype(x.dtype)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        # 5. up: when H or W is not a multiple of 2^num_upsamplers, upsample to the skip's size (as diffusers).
        last = cfg.num_blocks - 1
        factor = 2**cfg.num_upsamplers
        forward_size = sample.shape[1] % factor != 0 or sample.shape[2] % factor != 0
        for i, kind in enumerate(cfg.up_block_types):
            j = last - i  # the matching down level: per-block settings are read reversed
            n = cfg.layers[j] + 1
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if i < last and forward_size else None
            x = UpBlock(num_layers=n, add_upsample=i < last, name=f"up_blocks_{i}",
                        **_block_kwargs(cfg, j, kind == "CrossAttnUpBlock2D", cfg.block_out_channels[j], opts,
                                        cfg.up_depths(i)))(
                x, res, emb, context, size)

        # 6. out
        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out", padding_mode=self.padding_mode)(x)

    def _check_inputs(self, sample, timesteps, context, text_embeds, time_ids, timestep_cond) -> jax.Array:
        """Shape checks with one clear message each (shapes are static, so this costs nothing under jit)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet sample must be NHWC (batch, height, width, {cfg.in_channels}); got shape "
                             f"{tuple(sample.shape)}")
        batch = sample.shape[0]
        timesteps = jnp.asarray(timesteps, jnp.float32)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = jnp.broadcast_to(timesteps.reshape(()), (batch,))
        elif timesteps.shape != (batch,):
            raise ValueError(f"UNet timesteps must be a scalar or shape ({batch},); got {tuple(timesteps.shape)}")
        dims = set(cfg.cross_attention_dims)
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] not in dims:
            raise ValueError(f"UNet encoder_hidden_states must be ({batch}, tokens, {'/'.join(map(str, dims))}); "
                             f"got shape {tuple(context.shape)}")
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
            if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch \
                    or time_ids.shape[0] != batch:
                raise ValueError(f"UNet text_embeds and time_ids must be ({batch}, n); got "
                                 f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
            total = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
            if total != cfg.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"UNet text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give "
                    f"{total} features (pooled + time_ids x {cfg.addition_time_embed_dim}); the config's "
                    f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given, but this UNet has no addition_embed_type='text_time'")
        if timestep_cond is not None:
            if cfg.time_cond_proj_dim is None:
                raise ValueError("timestep_cond given, but this UNet has no time_cond_proj_dim")
            if timestep_cond.shape != (batch, cfg.time_cond_proj_dim):
                raise ValueError(f"UNet timestep_cond must be ({batch}, {cfg.time_cond_proj_dim}); got "
                                 f"{tuple(timestep_cond.shape)}")
        return timesteps


def _check_residuals(batch: int, down: Sequence[jax.Array] | None, mid: jax.Array | None) -> None:
    if (down is None) != (mid is None):
        # diffusers treats down-only residuals as deprecated T2I-Adapter input; sdjax asks for the explicit name.
        raise ValueError("ControlNet residuals need both down_block_additional_residuals and "
                         "mid_block_additional_residual (T2I-Adapter features go in "
                         "down_intrablock_additional_residuals)")
    for r in (*(down or ()), *(() if mid is None else (mid,))):
        if r.ndim != 4 or r.shape[0] != batch:
            raise ValueError(f"ControlNet residuals must be NHWC with batch {batch}; got shape {tuple(r.shape)}")


def ip_adapter_context(context: jax.Array, tokens: Sequence[jax.Array] | None,
                       scales: jax.Array | Sequence[float] | None) -> jax.Array | IPAdapterContext:
    """Pack IP-Adapter image tokens with the text context (the text context alone when there are none)."""
    if not tokens:
        if scales is not None:
            raise ValueError("ip_adapter_scales given without ip_adapter_tokens")
        return context
    flat = []
    for j, t in enumerate(tokens):
        if t.ndim == 4:  # (B, images, T, C): diffusers attends over all images' tokens at once
            t = t.reshape(t.shape[0], -1, t.shape[-1])
        if t.ndim != 3 or t.shape[0] != context.shape[0]:
            raise ValueError(f"ip_adapter_tokens[{j}] must be ({context.shape[0]}, tokens, dim); got {tuple(t.shape)}")
        flat.append(t)
    scales = jnp.ones((len(flat),), jnp.float32) if scales is None else jnp.asarray(scales, jnp.float32).reshape(-1)
    if scales.shape != (len(flat),):
        raise ValueError(f"ip_adapter_scales needs one value per adapter ({len(flat)}); got shape {scales.shape}")
    return IPAdapterContext(text=context, image_tokens=tuple(flat), scales=scales)


def example_inputs(config: UNetConfig, batch: int = 1, height: int | None = None, width: int | None = None,
                   tokens: int = 1, time_ids: int = 6, dtype: Any = jnp.float32,
                   ) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """Zero inputs of the right shapes for ``init``/``eval_shape``/warm-up compiles: ``(args, kwargs)``.

    SDXL (``addition_embed_type="text_time"``): ``time_ids`` values per image (6 for the base model, 5 for the
    refiner); text_embeds get the rest of ``projection_class_embeddings_input_dim``.
    """
    size = 2**config.num_upsamplers
    height, width = height or size, width or size
    args = (
        jnp.zeros((batch, height, width, config.in_channels), dtype),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, tokens, config.cross_attention_dims[0]), dtype),
    )
    kwargs: dict[str, jax.Array] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        if pooled < 1:
            raise ValueError(f"{time_ids} time ids leave no room for text_embeds in "
                             f"projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}")
        kwargs["text_embeds"] = jnp.zeros((batch, pooled), dtype)
        kwargs["time_ids"] = jnp.zeros((batch, time_ids), jnp.float32)
    if config.time_cond_proj_dim is not None:
        kwargs["timestep_cond"] = jnp.zeros((batch, config.time_cond_proj_dim), dtype)
    return args, kwargs
