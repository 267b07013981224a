"""A separate VAE or UNet applied onto a loaded model: ``sdjax.load(model, vae=PATH, unet=PATH)``.

VAE sources: an A1111 / ComfyUI VAE file (``.safetensors``, or ``.pt`` / ``.ckpt`` through the weights-only
loader) in the LDM layout with or without ``first_stage_model.``, a diffusers-layout VAE file, or a diffusers VAE
folder (its own ``config.json``: its scaling_factor and force_upcast, e.g. SDXL's fp16-fix VAE, which is an
AutoencoderKL with ``force_upcast: false``). A file carries no config: the model's own VAE config is the
default and the weights correct its shape.

UNet sources (SDXL-Lightning, Hyper-SD, distilled UNets): a UNet-only ``.safetensors`` / ``.ckpt`` in the diffusers
layout or the LDM one (with or without ``model.diffusion_model.``), a full single-file checkpoint (its UNet is
taken), or a diffusers UNet folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from sdjax.config import read_json
from sdjax.convert.architecture import infer_unet_config, infer_vae_config
from sdjax.convert.safe_load import CheckpointError, read_state_dict
from sdjax.convert.single_file import (
    UNET_PREFIX,
    VAE_PREFIX,
    convert_ldm_unet,
    convert_vae_inferring,
    ldm_unet_skeleton,
)
from sdjax.convert.unet import convert_unet
from sdjax.convert.vae import convert_vae
from sdjax.loaders.assemble import vae_param_dtype
from sdjax.loaders.diffusers_folder import read_component_weights
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.pipeline import Pipeline


def _component_folder(folder: Path, name: str) -> Path:
    """A component folder itself, or the component's sub-folder of a whole diffusers model folder."""
    if (folder / "config.json").is_file():
        return folder
    if (folder / name / "config.json").is_file():
        return folder / name
    raise FileNotFoundError(f"{folder} is not a diffusers {name} folder (no config.json, no {name}/config.json)")


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_vae(source: str | Path, base: VAEConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, diffusers-layout state dict) of a VAE file or folder; ``base``: the model's VAE config."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"vae: no file or folder at {path}")
    if path.is_dir():
        folder = _component_folder(path, "vae")
        return read_json(folder / "config.json"), read_component_weights(folder)
    state = _strip(read_state_dict(path), VAE_PREFIX)
    defaults = {"_class_name": "AutoencoderKL", **dataclasses.asdict(base)}
    if any(k.startswith("encoder.down_blocks.") for k in state):  # diffusers layout
        return infer_vae_config(state, defaults), state
    if any(k.startswith("encoder.down.") for k in state):  # LDM layout (A1111 / ComfyUI)
        converted, config = convert_vae_inferring(state, defaults)
        return config, converted
    raise CheckpointError(f"vae: {path} holds no VAE weights (no encoder.down.* or encoder.down_blocks.* keys)")


def read_unet(source: str | Path, base: UNetConfig, family: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, diffusers-layout state dict) of a UNet file or folder; ``base``: the model's UNet config."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"unet: no file or folder at {path}")
    if path.is_dir():
        folder = _component_folder(path, "unet")
        return read_json(folder / "config.json"), read_component_weights(folder)
    state = read_state_dict(path)
    defaults = {"_class_name": "UNet2DConditionModel", **dataclasses.asdict(base)}
    if any(k.startswith(UNET_PREFIX) for k in state) or "input_blocks.0.0.weight" in state:
        ldm = _strip(state, UNET_PREFIX)
        state = convert_ldm_unet(ldm, {**defaults, **ldm_unet_skeleton(ldm)})
    elif "conv_in.weight" not in state:
        raise CheckpointError(f"unet: {path} holds no UNet weights (no conv_in.weight or input_blocks.0.0.weight)")
    return infer_unet_config(state, defaults, family), state


def _family(pipe: Pipeline) -> str:
    if pipe.is_sdxl:
        return "sdxl"
    return "sd1" if pipe.unet.config.cross_attention_dims[0] == 768 or isinstance(
        pipe.unet.config.attention_head_dim, int) else "sd2"


def with_vae(pipe: Pipeline, source: str | Path) -> Pipeline:
    """``pipe`` with its VAE replaced by the one at ``source`` (see the module docstring)."""
    raw, state = read_vae(source, pipe.vae.config)
    config = VAEConfig.from_dict(raw)
    if config.latent_channels != pipe.unet.config.out_channels:
        raise CheckpointError(f"vae: {source} has {config.latent_channels} latent channels, but the model's UNet "
                              f"works on {pipe.unet.config.out_channels} (a VAE for another model family?)")
    dtype = pipe.unet.dtype
    params = convert_vae(state, config, dtype=vae_param_dtype(config, dtype))
    return pipe.with_vae(AutoencoderKL(config, dtype=vae_param_dtype(config, dtype)), params)


def with_unet(pipe: Pipeline, source: str | Path) -> Pipeline:
    """``pipe`` with its UNet replaced by the one at ``source`` (see the module docstring)."""
    raw, state = read_unet(source, pipe.unet.config, _family(pipe))
    config = UNetConfig.from_dict(raw)
    old = pipe.unet.config
    for key in ("in_channels", "addition_embed_type"):
        if getattr(config, key) != getattr(old, key):
            raise CheckpointError(f"unet: {source} has {key}={getattr(config, key)!r}, but the model's UNet has "
                                  f"{getattr(old, key)!r} (a UNet for another model family?)")
    if set(config.cross_attention_dims) != set(old.cross_attention_dims):
        raise CheckpointError(f"unet: {source} attends to a context of width {config.cross_attention_dim}, but "
                              f"the model's text encoders give {old.cross_attention_dim}")
    dtype = pipe.unet.dtype
    params = convert_unet(state, config, dtype=dtype)
    return pipe.with_unet(UNet2DConditionModel(config, dtype=dtype), params)
