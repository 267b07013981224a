"""Single-file Stable Diffusion checkpoints -> diffusers/transformers-layout state dicts plus configs.

"Single file" is the layout of the original training code (CompVis/LDM for SD 1.x/2.x, Stability's SGM for SDXL),
which A1111 and ComfyUI read and write as well:

====================================  ==========================================================================
``model.diffusion_model.*``           UNet (``input_blocks`` / ``middle_block`` / ``output_blocks`` ...)
``first_stage_model.*``               VAE (``encoder.down.N.block.M`` ...)
``cond_stage_model.transformer.*``    SD 1.x text encoder: transformers' CLIPTextModel (CLIP ViT-L/14)
``cond_stage_model.model.*``          SD 2.x text encoder: OpenCLIP ViT-H/14 (``transformer.resblocks.N``)
``conditioner.embedders.0/1.*``       SDXL: CLIP ViT-L (``.0.transformer``) and OpenCLIP bigG (``.1.model``);
                                      the refiner has only bigG, as ``.0.model``
====================================  ==========================================================================

One module per part: ``family`` (which architecture, prefixes, prediction type, shipped configs), ``unet``,
``vae`` and ``text_encoders`` (the layouts, both ways), ``common`` (renaming by tables). Everything is a
renaming table driven by the component's config (the UNet's block layout depends on
``layers_per_block``, the number of levels and which levels have attention) plus three reshapes: OpenCLIP's fused
``in_proj`` is split into q/k/v, its ``text_projection`` (used as ``x @ P``) becomes the Linear weight ``P.T``, and
the VAE's 1x1-conv attention projections are squeezed to Linear weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdjax.convert.architecture import infer_text_encoder_config, infer_unet_config
from sdjax.convert.safe_load import read_checkpoint
from sdjax.convert.single_file.common import _strip_prefix
from sdjax.convert.single_file.family import (
    _FAMILY_ENCODERS,
    CLIP_TOKENIZER,
    FAMILIES,
    OPENCLIP_TOKENIZER,
    PREDICTION_TYPES,
    UNET_PREFIX,
    VAE_PREFIX,
    _read_config_folder,
    _resolve_prediction_type,
    config_dir,
    detect_family,
    read_config_overrides,
)
from sdjax.convert.single_file.text_encoders import (
    _convert_encoder,
    _encoder_layers,
    clip_to_ldm,
    convert_clip_text,
    convert_openclip_text,
    openclip_to_ldm,
)
from sdjax.convert.single_file.unet import convert_ldm_unet, ldm_unet_skeleton, unet_module_table, unet_to_ldm
from sdjax.convert.single_file.vae import convert_ldm_vae, convert_vae_inferring, ldm_vae_skeleton, vae_to_ldm

__all__ = [
    "CLIP_TOKENIZER",
    "FAMILIES",
    "OPENCLIP_TOKENIZER",
    "PREDICTION_TYPES",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "SingleFileModel",
    "clip_to_ldm",
    "config_dir",
    "convert_clip_text",
    "convert_ldm_unet",
    "convert_ldm_vae",
    "convert_openclip_text",
    "convert_vae_inferring",
    "detect_family",
    "ldm_unet_skeleton",
    "ldm_vae_skeleton",
    "load_single_file",
    "openclip_to_ldm",
    "read_config_overrides",
    "split_single_file",
    "to_single_file",
    "unet_module_table",
    "unet_to_ldm",
    "vae_to_ldm",
]


@dataclass(frozen=True)
class SingleFileModel:
    """A single-file checkpoint split into diffusers-layout components.

    ``components`` maps "unet", "vae", "text_encoder" and/or "text_encoder_2" (those present in the file) to
    state dicts in diffusers/transformers key naming (CLIP keys carry the ``text_model.`` prefix).
    ``configs`` holds the config.json dict of every component of the family, ``scheduler_config`` the scheduler's
    (with the resolved ``prediction_type``), and ``tokenizers`` maps each text-encoder component to
    :data:`CLIP_TOKENIZER` or :data:`OPENCLIP_TOKENIZER`. ``config_name`` is the shipped config folder the
    defaults came from (``sd2_v`` for SD 2.x 768-v).
    """

    family: str
    components: dict[str, dict[str, np.ndarray]]
    configs: dict[str, dict[str, Any]]
    scheduler_config: dict[str, Any]
    tokenizers: dict[str, str]
    config_name: str

def load_single_file(
    path: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    configs: str | os.PathLike | Mapping[str, Mapping[str, Any]] | None = None,
) -> SingleFileModel:
    """Read a single-file checkpoint and split it (see :func:`split_single_file`).

    Unlike reading the state dict alone, this keeps the file's ``global_step`` for the SD 2.x v-prediction guess.
    """
    checkpoint = read_checkpoint(path)
    return split_single_file(
        checkpoint.state_dict, prediction_type=prediction_type, configs=configs, global_step=checkpoint.global_step
    )

def split_single_file(
    state_dict: Mapping[str, Any],
    *,
    prediction_type: str | None = None,
    configs: str | os.PathLike | Mapping[str, Mapping[str, Any]] | None = None,
    global_step: int | None = None,
) -> SingleFileModel:
    """Split a single-file state dict into diffusers-layout component state dicts plus configs.

    ``configs`` overrides the shipped configs component by component: a folder laid out like a diffusers model
    (``unet/config.json``, ``scheduler/scheduler_config.json`` ...) or a mapping from component name ("unet",
    "vae", "text_encoder", "text_encoder_2", "scheduler") to a config dict.

    Components without an overriding config get one read from the weights (``sdjax.convert.architecture``):
    the family's shipped config where the weights agree with it, so distilled and pruned UNets, other VAEs and
    text encoders of other sizes load from the file alone.

    ``prediction_type`` ("epsilon", "v_prediction" or "sample") wins over everything; then a prediction type in
    an overriding scheduler config; then, for SD 2.x text-to-image files, diffusers' heuristic: epsilon only
    when ``global_step`` is 875000 (the 512-base run), else v-prediction (768-v); every other family is epsilon.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    family = detect_family(state_dict)
    overrides = read_config_overrides(configs)
    prediction = _resolve_prediction_type(family, prediction_type, overrides.get("scheduler"), global_step)
    config_name = "sd2_v" if family == "sd2" and prediction == "v_prediction" else family
    shipped = _read_config_folder(config_dir(config_name))
    all_configs = {**shipped, **overrides}
    scheduler_config = {**all_configs.pop("scheduler"), "prediction_type": prediction}

    encoders = _FAMILY_ENCODERS[family.removesuffix("_inpaint")]
    unet = _strip_prefix(state_dict, UNET_PREFIX)
    if "unet" in overrides:
        components = {"unet": convert_ldm_unet(unet, all_configs["unet"])}
    else:
        components = {"unet": convert_ldm_unet(unet, {**shipped["unet"], **ldm_unet_skeleton(unet)})}
        all_configs["unet"] = infer_unet_config(components["unet"], shipped["unet"], family)
    vae = _strip_prefix(state_dict, VAE_PREFIX)
    if vae:
        components["vae"], config = convert_vae_inferring(vae, all_configs["vae"], explicit="vae" in overrides)
        all_configs["vae"] = config
    for encoder in encoders:
        weights = _strip_prefix(state_dict, encoder.prefix)
        if not weights:
            continue
        name = encoder.component
        if name in overrides:
            components[name] = _convert_encoder(encoder, weights, all_configs[name], family)
            continue
        layers = _encoder_layers(encoder, weights) - (1 if encoder.openclip and family.startswith("sd2") else 0)
        components[name] = _convert_encoder(encoder, weights, {**shipped[name], "num_hidden_layers": layers}, family)
        all_configs[name] = infer_text_encoder_config(components[name], shipped[name])

    wanted = ("unet", "vae", *(e.component for e in encoders))
    return SingleFileModel(
        family=family,
        components=components,
        configs={name: all_configs[name] for name in wanted},
        scheduler_config=scheduler_config,
        tokenizers={e.component: e.tokenizer for e in encoders},
        config_name=config_name,
    )

def to_single_file(
    family: str, components: Mapping[str, Mapping[str, Any]], configs: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Diffusers-layout component state dicts of ``family`` -> one single-file state dict (the inverse of
    :func:`split_single_file`, readable by A1111 / ComfyUI / diffusers' from_single_file)."""
    base = family.removesuffix("_inpaint")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(components["unet"], configs["unet"]).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(components["vae"], configs["vae"]).items()})
    for encoder in _FAMILY_ENCODERS[base]:
        state = components.get(encoder.component)
        if state is None:
            continue
        weights = openclip_to_ldm(state, extra_layer=base == "sd2") if encoder.openclip else clip_to_ldm(state)
        out.update({encoder.prefix + k: v for k, v in weights.items()})
    return out
