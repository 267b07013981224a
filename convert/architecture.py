"""Component configs read from the weights themselves (diffusers / transformers key layout).

What the shapes and key names decide: block channels, levels, layers per block, which blocks attend, transformer
depth per block and per layer, the mid block, context width, in/out channels, kernels, SDXL's addition embedding,
LCM's timestep-cond projection, linear vs conv projections; the VAE's channels, levels, latent channels and
quant convs; a text encoder's width, depth, MLP width, vocabulary, positions and projection.

What they cannot decide (attention head counts, norm groups, activations, scaling factors) comes from the
family's shipped config (``defaults``), or from the family's convention when the shape differs from it:
SD 1.x UNets use 8 heads per block, SD 2.x / SDXL UNets and every text encoder 64 channels per head.

Each function starts from ``defaults`` and changes only what the weights contradict, so a standard checkpoint
gets its shipped config back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sdjax.config import ConfigError

HEAD_CHANNELS = 64  # SD 2.x, SDXL and CLIP text encoders
SD1_HEADS = 8


def _count(keys: set[str], pattern: str) -> int:
    """How many consecutive indices n make ``pattern.format(n)`` a key prefix present in ``keys``."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def _has(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def _compact(values: list[Any]) -> Any:
    """One value when all are equal (as diffusers configs usually write it), else the list."""
    return values[0] if values and all(v == values[0] for v in values) else list(values)


def _keep_default(defaults: Mapping[str, Any], key: str, values: list[Any], *, compact: bool = True) -> Any:
    """The default's own spelling when it expands to the same per-block values, else the inferred one (one value
    when all are equal and ``compact``; lists for keys that must be lists, like block channels)."""
    if key in defaults and _normalise(_per_block(defaults[key], len(values))) == _normalise(values):
        return defaults[key]
    return _compact(values) if compact else list(values)


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(state[key].shape)


# --- UNet --------------------------------------------------------------------------------------------------------


def unet_heads(family: str, channels: list[int]) -> list[int]:
    """The family's head-count convention for blocks of these widths."""
    if family.startswith("sd1"):
        return [SD1_HEADS] * len(channels)
    return [max(1, c // HEAD_CHANNELS) for c in channels]


def infer_unet_config(state: Mapping[str, Any], defaults: Mapping[str, Any], family: str) -> dict[str, Any]:
    """A UNet2DConditionModel config for a diffusers-layout UNet state dict (see the module docstring)."""
    keys = set(state)
    if "conv_in.weight" not in keys or "conv_out.weight" not in keys:
        raise ConfigError("cannot read the UNet's architecture: conv_in.weight or conv_out.weight is missing")
    config = dict(defaults)
    c0, in_channels, k_in, _ = _shape(state, "conv_in.weight")
    out_channels, _, k_out, _ = _shape(state, "conv_out.weight")
    config.update(in_channels=in_channels, out_channels=out_channels)
    for key, value in (("conv_in_kernel", k_in), ("conv_out_kernel", k_out)):
        if value != config.get(key, 3):
            config[key] = value

    levels = _count(keys, "down_blocks.{}.resnets.0.")
    if levels == 0 or _count(keys, "up_blocks.{}.resnets.0.") != levels:
        raise ConfigError(f"cannot read the UNet's architecture: {levels} down blocks and "
                          f"{_count(keys, 'up_blocks.{}.resnets.0.')} up blocks")
    channels = [_shape(state, f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    layers = [_count(keys, f"down_blocks.{i}.resnets.{{}}.") for i in range(levels)]
    down_attn = [_has(keys, f"down_blocks.{i}.attentions.0.") for i in range(levels)]
    up_attn = [_has(keys, f"up_blocks.{i}.attentions.0.") for i in range(levels)]
    for i in range(levels):
        up_layers = _count(keys, f"up_blocks.{i}.resnets.{{}}.")
        if up_layers != layers[levels - 1 - i] + 1:
            raise ConfigError(f"UNet up block {i} has {up_layers} resnets; diffusers' UNet needs one more than the "
                              f"matching down block's {layers[levels - 1 - i]}")
    config["block_out_channels"] = _keep_default(defaults, "block_out_channels", channels, compact=False)
    config["layers_per_block"] = _keep_default(defaults, "layers_per_block", layers)
    down_types = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn]
    up_types = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn]
    config["down_block_types"] = _keep_default(defaults, "down_block_types", down_types, compact=False)
    config["up_block_types"] = _keep_default(defaults, "up_block_types", up_types, compact=False)

    def depth(prefix: str) -> int:
        return _count(keys, prefix + ".transformer_blocks.{}.")

    down_depths = [[depth(f"down_blocks.{i}.attentions.{j}") for j in range(layers[i])] if down_attn[i] else None
                   for i in range(levels)]
    up_depths = [[depth(f"up_blocks.{i}.attentions.{j}") for j in range(layers[levels - 1 - i] + 1)]
                 if up_attn[i] else None for i in range(levels)]
    has_mid = _has(keys, "mid_block.")
    mid_depth = depth("mid_block.attentions.0") if has_mid else None
    if has_mid and not _has(keys, "mid_block.attentions.0."):
        raise ConfigError("the UNet's mid block has no attention (UNetMidBlock2D), which sdjax does not support")
    _set_depths(config, defaults, down_depths, up_depths, mid_depth)
    if not has_mid:
        config["mid_block_type"] = None
    elif defaults.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        config["mid_block_type"] = "UNetMidBlock2DCrossAttn"

    attn_keys = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    if attn_keys:
        config["cross_attention_dim"] = _context_width(state, attn_keys, defaults, levels)
        proj = next(k for k in sorted(keys) if k.endswith(".proj_in.weight"))
        config["use_linear_projection"] = len(_shape(state, proj)) == 2
    if _normalise(_per_block(defaults.get("block_out_channels"), levels)) != channels or \
            "attention_head_dim" not in defaults:
        config["attention_head_dim"] = _compact(unet_heads(family, channels))

    temb = _shape(state, "time_embedding.linear_1.weight")[0]
    config["time_embedding_dim"] = None if temb == 4 * c0 else temb
    if "time_embedding.cond_proj.weight" in keys:
        config["time_cond_proj_dim"] = _shape(state, "time_embedding.cond_proj.weight")[1]
    else:
        config["time_cond_proj_dim"] = None
    if "add_embedding.linear_1.weight" in keys:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = _shape(state, "add_embedding.linear_1.weight")[1]
        config.setdefault("addition_time_embed_dim", 256)
        config["addition_time_embed_dim"] = config["addition_time_embed_dim"] or 256
    else:
        for key in ("addition_embed_type", "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
            config[key] = None
    return {k: v for k, v in config.items() if not (v is None and k not in defaults and k != "mid_block_type")}


def _context_width(state: Mapping[str, Any], attn_keys: list[str], defaults: Mapping[str, Any], levels: int) -> Any:
    widths = {_shape(state, k)[1] for k in attn_keys}
    if len(widths) == 1:
        width = widths.pop()
        default = defaults.get("cross_attention_dim")
        return default if _per_block(default, levels) == [width] * levels else width
    per_block = []
    for i in range(levels):
        found = [k for k in attn_keys if k.startswith(f"down_blocks.{i}.")]
        per_block.append(_shape(state, found[0])[1] if found else None)
    known = [w for w in per_block if w is not None]
    return [w if w is not None else known[-1] for w in per_block]


def _set_depths(config: dict[str, Any], defaults: Mapping[str, Any], down: list[list[int] | None],
                up: list[list[int] | None], mid: int | None) -> None:
    """transformer_layers_per_block (+ reverse_transformer_layers_per_block when the up blocks differ)."""
    levels = len(down)
    # Blocks without attention take any value: they keep the default's, so standard configs come back unchanged.
    down_values: list[Any] = [_compact(d) if d else None for d in down]
    if mid is not None and down_values[-1] is None:
        down_values[-1] = mid  # diffusers' mid block reads the last down block's depth
    fallback = _per_block(defaults.get("transformer_layers_per_block", 1), levels)
    down_values = [(fallback[i] if isinstance(fallback[i], int) else 1) if v is None else v
                   for i, v in enumerate(down_values)]
    mirrored = [down_values[levels - 1 - i] for i in range(levels)]
    reverse_needed = any(
        u is not None and (not isinstance(mirrored[i], int) or any(d != mirrored[i] for d in u))
        for i, u in enumerate(up))
    last = down_values[-1]
    if mid is not None and (last[0] if isinstance(last, list) else last) != mid:
        raise ConfigError(f"the UNet's mid block has {mid} transformer layers but its last down block "
                          f"{last}: diffusers' UNet cannot express that")
    config["transformer_layers_per_block"] = _keep_default(defaults, "transformer_layers_per_block", down_values)
    if reverse_needed:
        config["reverse_transformer_layers_per_block"] = [
            _compact(u) if u else mirrored[i] if isinstance(mirrored[i], int) else 1 for i, u in enumerate(up)]
    elif defaults.get("reverse_transformer_layers_per_block") is not None:
        config["reverse_transformer_layers_per_block"] = None


# --- VAE ---------------------------------------------------------------------------------------------------------


def infer_vae_config(state: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """An AutoencoderKL config for a diffusers-layout VAE state dict."""
    keys = set(state)
    for needed in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if needed not in keys:
            raise ConfigError(f"cannot read the VAE's architecture: {needed} is missing")
    levels = _count(keys, "encoder.down_blocks.{}.resnets.0.")
    channels = [_shape(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    config = dict(defaults)
    config.update(
        in_channels=_shape(state, "encoder.conv_in.weight")[1],
        out_channels=_shape(state, "decoder.conv_out.weight")[0],
        latent_channels=_shape(state, "decoder.conv_in.weight")[1],
        block_out_channels=_keep_default(defaults, "block_out_channels", channels, compact=False),
        layers_per_block=_count(keys, "encoder.down_blocks.0.resnets.{}."),
        down_block_types=_keep_default(defaults, "down_block_types", ["DownEncoderBlock2D"] * levels,
                                       compact=False),
        up_block_types=_keep_default(defaults, "up_block_types", ["UpDecoderBlock2D"] * levels, compact=False),
    )
    for key, present in (("use_quant_conv", "quant_conv.weight" in keys),
                         ("use_post_quant_conv", "post_quant_conv.weight" in keys),
                         ("mid_block_add_attention", _has(keys, "encoder.mid_block.attentions.0."))):
        if present != defaults.get(key, True):
            config[key] = present
    if config.get("latents_mean") is not None and len(config["latents_mean"]) != config["latent_channels"]:
        config["latents_mean"] = config["latents_std"] = None
    return config


# --- text encoders -----------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")


def infer_text_encoder_config(state: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A CLIPTextConfig dict for a transformers-layout CLIP text encoder state dict (either key prefix)."""
    def get(key: str) -> tuple[int, ...]:
        for name in (f"text_model.{key}", key):
            if name in state:
                return _shape(state, name)
        raise ConfigError(f"cannot read the text encoder's architecture: {key} is missing")

    vocab, hidden = get("embeddings.token_embedding.weight")
    layers = 1 + max((int(m[1]) for k in state if (m := _LAYER.match(k))), default=-1)
    config = dict(defaults)
    config.update(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        max_position_embeddings=get("embeddings.position_embedding.weight")[0],
        intermediate_size=get("encoder.layers.0.mlp.fc1.weight")[0] if layers else defaults.get("intermediate_size"),
    )
    if hidden != defaults.get("hidden_size"):
        config["num_attention_heads"] = max(1, hidden // HEAD_CHANNELS)
    if "text_projection.weight" in state:
        config["projection_dim"] = _shape(state, "text_projection.weight")[0]
    return config
