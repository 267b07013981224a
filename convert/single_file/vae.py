"""The LDM VAE layout (``encoder.down.N.block.M`` ...) <-> diffusers' AutoencoderKL; also standalone VAE files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdjax.convert.architecture import infer_vae_config
from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.single_file.common import Renames, _has_prefix, _invert_modules, _rename_modules, _require


def convert_vae_inferring(
    weights: Mapping[str, Any], config: Mapping[str, Any], *, explicit: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """LDM VAE weights -> (AutoencoderKL state dict, its config): ``config`` as given when ``explicit``, else
    ``config`` corrected to what the weights show (levels, channels, latent channels ...)."""
    if explicit:
        return convert_ldm_vae(weights, config), dict(config)
    converted = convert_ldm_vae(weights, {**config, **ldm_vae_skeleton(weights)})
    return converted, infer_vae_config(converted, config)

def ldm_vae_skeleton(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Levels, resnets per level and mid-block attention of an LDM VAE (keys without ``first_stage_model.``)."""
    levels = 0
    while _has_prefix(weights, f"encoder.down.{levels}."):
        levels += 1
    layers = 0
    while _has_prefix(weights, f"encoder.down.0.block.{layers}."):
        layers += 1
    if not levels or not layers:
        raise CheckpointError("cannot read the VAE's architecture: no encoder.down.N.block.M weights")
    return {
        "block_out_channels": [0] * levels,  # only the count matters for the renaming table
        "layers_per_block": layers,
        "mid_block_add_attention": _has_prefix(weights, "encoder.mid.attn_1."),
    }

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}

_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

_VAE_FIXED: dict[str, tuple[str, Renames]] = {
    "encoder.conv_in": ("encoder.conv_in", None),
    "encoder.norm_out": ("encoder.conv_norm_out", None),
    "encoder.conv_out": ("encoder.conv_out", None),
    "decoder.conv_in": ("decoder.conv_in", None),
    "decoder.norm_out": ("decoder.conv_norm_out", None),
    "decoder.conv_out": ("decoder.conv_out", None),
    "quant_conv": ("quant_conv", None),
    "post_quant_conv": ("post_quant_conv", None),
}

_VAE_IGNORED_PREFIXES = ("loss.",)  # training-only perceptual/discriminator weights some files carry

def convert_ldm_vae(weights: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """LDM VAE weights (keys without ``first_stage_model.``) -> AutoencoderKL state dict.

    Also takes standalone VAE files in the LDM layout (``encoder.down.0.block.0...``).
    """
    _require(config, ("block_out_channels", "layers_per_block"), "VAE")
    weights = {k: v for k, v in weights.items() if not k.startswith(_VAE_IGNORED_PREFIXES)}
    out = _rename_modules(weights, _vae_modules(config), "VAE")
    for key, value in out.items():
        # LDM's mid-block attention projects with 1x1 convs; diffusers with Linear layers.
        if ".attentions." in key and key.endswith(".weight") and value.ndim > 2:
            out[key] = value.reshape(value.shape[:2])
    return out

def _vae_modules(config: Mapping[str, Any]) -> dict[str, tuple[str, Renames]]:
    """The LDM -> diffusers module table for a VAE config.

    LDM's decoder numbers ``up.K`` from the lowest resolution up; diffusers' ``up_blocks.I`` run from the top
    down, so ``I = levels - 1 - K``. The decoder has one more resnet per level than the encoder.
    """
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    modules = dict(_VAE_FIXED)
    for part in ("encoder", "decoder"):
        modules[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RESNET)
        modules[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RESNET)
        if config.get("mid_block_add_attention", True):
            modules[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
    for i in range(levels):
        for j in range(layers):
            modules[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < levels - 1:
            modules[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", None)
        k = levels - 1 - i
        for j in range(layers + 1):
            modules[f"decoder.up.{k}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < levels - 1:
            modules[f"decoder.up.{k}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", None)
    return modules

def vae_to_ldm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL state dict -> LDM VAE keys (without ``first_stage_model.``); attention back to 1x1 convs."""
    out = _invert_modules(state, _vae_modules(config), "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out
