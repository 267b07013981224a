"""The LDM UNet layout (``input_blocks`` / ``middle_block`` / ``output_blocks``) <-> diffusers' UNet2DConditionModel."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.single_file.common import Renames, _has_prefix, _invert_modules, _rename_modules, _require


def ldm_unet_skeleton(weights: Mapping[str, Any]) -> dict[str, Any]:
    """The block structure of an LDM UNet (keys without ``model.diffusion_model.``), as diffusers config keys:
    enough to build the renaming table; :func:`~sdjax.convert.architecture.infer_unet_config` reads the rest."""
    keys = set(weights)
    layers, attention, current, has_attention = [], [], 0, set()
    index = 1
    while _has_prefix(weights, f"input_blocks.{index}."):
        if _has_prefix(weights, f"input_blocks.{index}.0.op."):
            layers.append(current)
            attention.append(bool(has_attention))
            current, has_attention = 0, set()
        else:
            current += 1
            if _has_prefix(weights, f"input_blocks.{index}.1."):
                has_attention.add(index)
        index += 1
    layers.append(current)
    attention.append(bool(has_attention))
    if 0 in layers:
        raise CheckpointError(f"cannot read the UNet's block structure: a level without resnets (layers {layers})")
    up_attention, index = [], 0
    for count in reversed(layers):
        up_attention.append(any(_has_prefix(weights, f"output_blocks.{index + j}.1.proj_in.")
                                for j in range(count + 1)))
        index += count + 1
    if _has_prefix(weights, "middle_block.1.proj_in."):
        mid: str | None = "UNetMidBlock2DCrossAttn"
    elif _has_prefix(weights, "middle_block."):
        raise CheckpointError("the UNet's middle block has no attention (ComfyUI transformer_depth_middle=-1), "
                              "which diffusers' UNet2DConditionModel and sdjax cannot express")
    else:
        mid = None
    return {
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "layers_per_block": layers,
        "mid_block_type": mid,
        "addition_embed_type": "text_time" if "label_emb.0.0.weight" in keys else None,
    }

_UNET_RESNET = {  # LDM ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

_UNET_FIXED: dict[str, tuple[str, Renames]] = {
    "time_embed.0": ("time_embedding.linear_1", None),
    "time_embed.2": ("time_embedding.linear_2", None),
    "input_blocks.0.0": ("conv_in", None),
    "out.0": ("conv_norm_out", None),
    "out.2": ("conv_out", None),
}

_UNET_SDXL_EMBEDDING: dict[str, tuple[str, Renames]] = {  # SDXL's size/crop(/aesthetic) embedding
    "label_emb.0.0": ("add_embedding.linear_1", None),
    "label_emb.0.2": ("add_embedding.linear_2", None),
}

def convert_ldm_unet(weights: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """LDM UNet weights (keys without ``model.diffusion_model.``) -> UNet2DConditionModel state dict."""
    _require(config, ("in_channels", "down_block_types", "up_block_types", "layers_per_block"), "UNet")
    conv_in = weights.get("input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != config["in_channels"]:
        raise CheckpointError(
            f"UNet config expects in_channels={config['in_channels']}, "
            f"but the checkpoint's input conv takes {conv_in.shape[1]}"
        )
    return _rename_modules(weights, unet_module_table(config), "UNet")

def unet_module_table(config: Mapping[str, Any]) -> dict[str, tuple[str, Renames]]:
    """The LDM -> diffusers module table for a UNet config.

    LDM numbers ``input_blocks`` consecutively: per level, ``layers_per_block`` (resnet[, attention]) pairs, then
    a downsampler on every level but the last. ``output_blocks`` run over the levels in reverse with one extra
    pair each, the upsampler sitting after the attention (index 2) or directly after the resnet (index 1).
    """
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    modules = dict(_UNET_FIXED)
    if config.get("addition_embed_type") == "text_time":
        modules.update(_UNET_SDXL_EMBEDDING)

    index = 1
    for level, block_type in enumerate(down_types):
        attention = _has_cross_attention(block_type, "down")
        for j in range(layers[level]):
            modules[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                modules[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", None)
            index += 1
        if level < levels - 1:
            modules[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", None)
            index += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", None):
        raise CheckpointError(f"unsupported UNet mid_block_type {mid_type!r}")
    if mid_type is not None:
        modules["middle_block.0"] = ("mid_block.resnets.0", _UNET_RESNET)
        modules["middle_block.1"] = ("mid_block.attentions.0", None)
        modules["middle_block.2"] = ("mid_block.resnets.1", _UNET_RESNET)

    index = 0
    for level, block_type in enumerate(up_types):
        attention = _has_cross_attention(block_type, "up")
        count = list(reversed(layers))[level] + 1
        for j in range(count):
            modules[f"output_blocks.{index}.0"] = (f"up_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                modules[f"output_blocks.{index}.1"] = (f"up_blocks.{level}.attentions.{j}", None)
            if j == count - 1 and level < levels - 1:
                upsampler = f"output_blocks.{index}.{2 if attention else 1}.conv"
                modules[upsampler] = (f"up_blocks.{level}.upsamplers.0.conv", None)
            index += 1
    return modules

def _has_cross_attention(block_type: str, direction: str) -> bool:
    plain = "DownBlock2D" if direction == "down" else "UpBlock2D"
    cross = "CrossAttn" + plain
    if block_type not in (plain, cross):
        raise CheckpointError(f"unsupported UNet {direction} block type {block_type!r} (supported: {plain}, {cross})")
    return block_type == cross

def _per_level(value: int | Iterable[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)

def unet_to_ldm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel state dict -> LDM UNet keys (without ``model.diffusion_model.``)."""
    return _invert_modules(state, unet_module_table(config), "UNet")
