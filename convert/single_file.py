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

Everything here is a renaming table driven by the component's config (the UNet's block layout depends on
``layers_per_block``, the number of levels and which levels have attention) plus three reshapes: OpenCLIP's fused
``in_proj`` is split into q/k/v, its ``text_projection`` (used as ``x @ P``) becomes the Linear weight ``P.T``, and
the VAE's 1x1-conv attention projections are squeezed to Linear weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdjax.convert.architecture import infer_text_encoder_config, infer_unet_config, infer_vae_config
from sdjax.convert.safe_load import CheckpointError, read_checkpoint

__all__ = [
    "CLIP_TOKENIZER",
    "FAMILIES",
    "OPENCLIP_TOKENIZER",
    "SingleFileModel",
    "config_dir",
    "convert_clip_text",
    "convert_ldm_unet",
    "convert_ldm_vae",
    "convert_openclip_text",
    "detect_family",
    "load_single_file",
    "split_single_file",
]

FAMILIES = ("sd1", "sd1_inpaint", "sd2", "sd2_inpaint", "sdxl", "sdxl_inpaint", "sdxl_refiner")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Tokenizer conventions: the same CLIP BPE vocabulary, padded with <|endoftext|> (OpenAI CLIP, as SD 1.x and
# SDXL's first encoder were trained) or with "!" (token 0, as OpenCLIP pads: SD 2.x and SDXL's second encoder).
CLIP_TOKENIZER = "clip"
OPENCLIP_TOKENIZER = "openclip"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# The 512-base SD 2.x training run ended at this step; diffusers takes any other SD 2.x checkpoint as 768-v.
_SD2_EPSILON_GLOBAL_STEP = 875000


@dataclass(frozen=True)
class _Encoder:
    component: str  # diffusers component name
    prefix: str  # key prefix in the single file
    openclip: bool  # OpenCLIP layout (resblocks, fused in_proj) rather than transformers' CLIPTextModel layout
    projection: bool  # the diffusers model is CLIPTextModelWithProjection (keeps text_projection)
    tokenizer: str


_SD1_CLIP = _Encoder("text_encoder", "cond_stage_model.transformer.", False, False, CLIP_TOKENIZER)
_SD2_OPENCLIP = _Encoder("text_encoder", "cond_stage_model.model.", True, False, OPENCLIP_TOKENIZER)
_SDXL_CLIP = _Encoder("text_encoder", "conditioner.embedders.0.transformer.", False, False, CLIP_TOKENIZER)
_SDXL_OPENCLIP = _Encoder("text_encoder_2", "conditioner.embedders.1.model.", True, True, OPENCLIP_TOKENIZER)
_REFINER_OPENCLIP = _Encoder("text_encoder_2", "conditioner.embedders.0.model.", True, True, OPENCLIP_TOKENIZER)

# Base family -> its text encoders; the first family whose encoder prefixes are all present wins. Order matters:
# SDXL base also has a "conditioner.embedders.0." encoder, but as ".transformer", the refiner's is ".model".
_FAMILY_ENCODERS: dict[str, tuple[_Encoder, ...]] = {
    "sdxl": (_SDXL_CLIP, _SDXL_OPENCLIP),
    "sdxl_refiner": (_REFINER_OPENCLIP,),
    "sd2": (_SD2_OPENCLIP,),
    "sd1": (_SD1_CLIP,),
}

# Used only when a file carries no text encoder: the UNet's cross-attention width names the family.
_FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}


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


# --- public entry points -----------------------------------------------------------------------------------------


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


def convert_vae_inferring(
    weights: Mapping[str, Any], config: Mapping[str, Any], *, explicit: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """LDM VAE weights -> (AutoencoderKL state dict, its config): ``config`` as given when ``explicit``, else
    ``config`` corrected to what the weights show (levels, channels, latent channels ...)."""
    if explicit:
        return convert_ldm_vae(weights, config), dict(config)
    converted = convert_ldm_vae(weights, {**config, **ldm_vae_skeleton(weights)})
    return converted, infer_vae_config(converted, config)


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


def _encoder_layers(encoder: _Encoder, weights: Mapping[str, Any]) -> int:
    prefix = "transformer.resblocks.{}." if encoder.openclip else "text_model.encoder.layers.{}."
    n = 0
    while _has_prefix(weights, prefix.format(n)) or (
            not encoder.openclip and _has_prefix(weights, f"encoder.layers.{n}.")):
        n += 1
    return n


def detect_family(state_dict: Mapping[str, Any]) -> str:
    """Name the architecture of a single-file state dict: one of :data:`FAMILIES`."""
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(
            f"unknown architecture: no Stable Diffusion UNet ({UNET_PREFIX}input_blocks.0.0.weight is missing); "
            f"found {_describe_prefixes(state_dict)}"
        )
    family = _base_family(state_dict)
    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in state_dict
    if has_label_emb != family.startswith("sdxl"):
        raise CheckpointError(
            f"unknown architecture: the text encoders look like {family}, but the UNet "
            f"{'has' if has_label_emb else 'lacks'} SDXL's size/crop embedding (label_emb); "
            f"found {_describe_prefixes(state_dict)}"
        )
    in_channels = conv_in.shape[1]
    if in_channels == 4:
        return family
    if in_channels == 9 and family != "sdxl_refiner":
        return family + "_inpaint"  # 4 latent + 4 masked-image latent + 1 mask channels
    raise CheckpointError(
        f"unknown architecture: the {family} UNet's input conv takes {in_channels} channels "
        "(supported: 4 for text-to-image, 9 for inpainting)"
    )


def config_dir(name: str) -> Path:
    """The shipped diffusers-style config folder for a family (or ``sd2_v``, SD 2.x 768-v)."""
    import sdjax.assets

    folder = Path(sdjax.assets.__file__).parent / "configs" / name
    if not folder.is_dir():
        names = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
        raise ValueError(f"no shipped config named {name!r}; available: {', '.join(names)}")
    return folder


# --- family and prediction type ----------------------------------------------------------------------------------


def _base_family(state_dict: Mapping[str, Any]) -> str:
    for family, encoders in _FAMILY_ENCODERS.items():
        if all(_has_prefix(state_dict, e.prefix) for e in encoders):
            return family
    context_dim = next(
        (v.shape[1] for k, v in state_dict.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
        None,
    )
    if context_dim in _FAMILY_BY_CONTEXT_DIM:
        return _FAMILY_BY_CONTEXT_DIM[context_dim]
    raise CheckpointError(
        "unknown architecture: no known text encoder layout (cond_stage_model.transformer / cond_stage_model.model "
        f"/ conditioner.embedders) and a UNet cross-attention width of {context_dim} "
        f"(known: {sorted(_FAMILY_BY_CONTEXT_DIM)}); found {_describe_prefixes(state_dict)}"
    )


def _resolve_prediction_type(
    family: str, explicit: str | None, scheduler_override: Mapping[str, Any] | None, global_step: int | None
) -> str:
    if explicit is not None:
        return explicit
    if scheduler_override and "prediction_type" in scheduler_override:
        return str(scheduler_override["prediction_type"])
    if family == "sd2":  # 512-base and 768-v share one architecture: only the training step tells them apart
        return "epsilon" if global_step == _SD2_EPSILON_GLOBAL_STEP else "v_prediction"
    return "epsilon"


# --- configs -----------------------------------------------------------------------------------------------------

_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def _read_config_folder(folder: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for name, relative in _CONFIG_FILES.items():
        file = folder / relative
        if file.is_file():
            try:
                configs[name] = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
    return configs


def read_config_overrides(
    configs: str | os.PathLike | Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """Component configs from a diffusers-layout folder or a mapping of component name -> config dict."""
    if configs is None:
        return {}
    if isinstance(configs, str | os.PathLike):
        folder = Path(configs)
        if not folder.is_dir():
            raise ValueError(f"configs={str(configs)!r} is not a folder laid out like a diffusers model")
        found = _read_config_folder(folder)
        if not found:
            raise ValueError(f"configs folder {folder} holds none of {', '.join(_CONFIG_FILES.values())}")
        return found
    if isinstance(configs, Mapping):
        unknown = sorted(set(configs) - set(_CONFIG_FILES))
        if unknown:
            raise ValueError(f"configs has unknown components {unknown}; known: {sorted(_CONFIG_FILES)}")
        return {name: dict(config) for name, config in configs.items()}
    raise TypeError(f"configs must be a folder path or a mapping of config dicts, got {type(configs).__name__}")


# --- UNet --------------------------------------------------------------------------------------------------------

# Module renames: LDM module prefix -> (diffusers module prefix, renames of the keys inside it). ``None`` keeps
# the inner keys as they are (LDM's SpatialTransformer already uses diffusers' Transformer2DModel names).
Renames = Mapping[str, str] | None

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


# --- VAE ---------------------------------------------------------------------------------------------------------

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


# --- text encoders -----------------------------------------------------------------------------------------------

_CLIP_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")
# Extras some files carry that CLIPTextModel has no place for: a buffer, and CLIP's contrastive-head leftovers.
_CLIP_IGNORED = ("embeddings.position_ids", "text_projection.weight", "logit_scale")

_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = {  # inside transformer.resblocks.N (the fused attn.in_proj_* is split separately)
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")


def convert_clip_text(weights: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel weights, with or without ``text_model.``, -> keys with ``text_model.``."""
    _require(config, ("num_hidden_layers",), "CLIP text encoder")
    out, unexpected = {}, []
    for key, value in weights.items():
        inner = key.removeprefix("text_model.")
        if inner in _CLIP_IGNORED:
            continue
        if not inner.startswith(_CLIP_TOP_LEVEL):
            unexpected.append(key)
            continue
        out["text_model." + inner] = value
    _check_clip_keys(out, unexpected, config["num_hidden_layers"], projection=False, what="CLIP text encoder")
    return out


def convert_openclip_text(
    weights: Mapping[str, Any], config: Mapping[str, Any], *, projection: bool, drop_extra_layers: bool = False
) -> dict[str, Any]:
    """OpenCLIP text tower weights (keys after ``...model.``) -> CLIPTextModel(WithProjection) state dict.

    ``drop_extra_layers`` drops resblocks beyond the config's ``num_hidden_layers``: SD 2.x conditions on the
    penultimate layer, so its 24-block OpenCLIP-H becomes a 23-layer CLIPTextModel (as diffusers does).
    """
    _require(config, ("num_hidden_layers",), "OpenCLIP text encoder")
    num_layers = config["num_hidden_layers"]
    out, unexpected = {}, []
    for key, value in weights.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = np.ascontiguousarray(np.asarray(value).T)  # x @ P == Linear(P.T)
        elif key.startswith("transformer.resblocks."):
            layer, _, inner = key.removeprefix("transformer.resblocks.").partition(".")
            if not layer.isdigit():
                unexpected.append(key)
                continue
            if int(layer) >= num_layers and drop_extra_layers:
                continue
            converted = _convert_openclip_layer(f"text_model.encoder.layers.{layer}", inner, value)
            if converted is None:
                unexpected.append(key)
            else:
                out.update(converted)
        elif key not in _OPENCLIP_IGNORED:
            unexpected.append(key)
    _check_clip_keys(out, unexpected, num_layers, projection=projection, what="OpenCLIP text encoder")
    return out


def _convert_openclip_layer(target: str, inner: str, value: Any) -> dict[str, Any] | None:
    if inner in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if inner.endswith("weight") else "bias"
        q, k, v = np.split(np.asarray(value), 3, axis=0)  # rows are [q; k; v]
        return {f"{target}.self_attn.{name}_proj.{leaf}": part for name, part in zip("qkv", (q, k, v), strict=True)}
    module, _, leaf = inner.rpartition(".")
    if module in _OPENCLIP_LAYER and leaf in ("weight", "bias"):
        return {f"{target}.{_OPENCLIP_LAYER[module]}.{leaf}": value}
    return None


def _clip_keys(num_layers: int, projection: bool) -> set[str]:
    """Every key of a transformers CLIPTextModel(WithProjection) state dict."""
    keys = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    }
    layer_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    layer_modules += ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    for n in range(num_layers):
        keys.update(f"text_model.encoder.layers.{n}.{m}.{leaf}" for m in layer_modules for leaf in ("weight", "bias"))
    if projection:
        keys.add("text_projection.weight")
    return keys


def _check_clip_keys(out: Mapping[str, Any], unexpected: list[str], num_layers: int, projection: bool, what: str):
    expected = _clip_keys(num_layers, projection)
    missing = sorted(expected - set(out))
    unexpected = unexpected + sorted(set(out) - expected)
    problems = [f"missing {_preview(missing)}"] if missing else []
    problems += [f"unexpected {_preview(unexpected)}"] if unexpected else []
    if problems:
        raise CheckpointError(f"{what} does not match its config ({num_layers} layers): " + "; ".join(problems))


def _convert_encoder(encoder: _Encoder, weights: Mapping[str, Any], config: Mapping[str, Any], family: str):
    if not encoder.openclip:
        return convert_clip_text(weights, config)
    return convert_openclip_text(
        weights, config, projection=encoder.projection, drop_extra_layers=family.startswith("sd2")
    )


# --- shared helpers ----------------------------------------------------------------------------------------------


def _rename_modules(
    weights: Mapping[str, Any], modules: Mapping[str, tuple[str, Renames]], what: str
) -> dict[str, Any]:
    """Rename every key by its module table entry; report unplaced keys and absent modules together."""
    out, unplaced, used = {}, [], set()
    for key, value in weights.items():
        module, inner = _find_module(key, modules)
        if module is None:
            unplaced.append(key)
            continue
        target, renames = modules[module]
        renamed = _rename_inner(inner, renames)
        if renamed is None:
            unplaced.append(key)
            continue
        out[f"{target}.{renamed}"] = value
        used.add(module)
    missing = [m for m in modules if m not in used]
    if unplaced or missing:
        problems = []
        if unplaced:
            problems.append(f"{len(unplaced)} weights have no place in it ({_preview(unplaced)})")
        if missing:
            problems.append(f"{len(missing)} of its modules are absent from the file ({_preview(missing)})")
        raise CheckpointError(f"{what} weights do not match the {what} config: " + "; ".join(problems))
    return out


def _find_module(key: str, modules: Mapping[str, Any]) -> tuple[str | None, str]:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest prefix first
        prefix = ".".join(parts[:n])
        if prefix in modules:
            return prefix, ".".join(parts[n:])
    return None, key


def _rename_inner(inner: str, renames: Renames) -> str | None:
    if renames is None:
        return inner
    for old, new in renames.items():
        if inner.startswith(old + "."):
            return new + inner[len(old) :]
    return None


def _require(config: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [key for key in keys if key not in config]
    if missing:
        raise ValueError(f"{what} config lacks {', '.join(missing)}")


def _has_prefix(state_dict: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _describe_prefixes(state_dict: Mapping[str, Any]) -> str:
    """``"model.diffusion_model (686 keys), first_stage_model (248 keys)"``: enough to recognise a file."""
    counts: dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        head = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        counts[head] = counts.get(head, 0) + 1
    if not counts:
        return "an empty state dict"
    shown = sorted(counts.items(), key=lambda item: -item[1])[:8]
    more = f", and {len(counts) - len(shown)} more" if len(counts) > len(shown) else ""
    return ", ".join(f"{head} ({n} keys)" for head, n in shown) + more


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# --- writing: diffusers-layout components -> one single-file state dict ------------------------------------------


def _invert_modules(
    state: Mapping[str, Any], modules: Mapping[str, tuple[str, Renames]], what: str
) -> dict[str, Any]:
    """The inverse of :func:`_rename_modules`: diffusers keys back to the original layout's, by the same table."""
    inverse = {target: (module, renames) for module, (target, renames) in modules.items()}
    out, unplaced = {}, []
    for key, value in state.items():
        target, inner = _find_module(key, inverse)
        if target is None:
            unplaced.append(key)
            continue
        module, renames = inverse[target]
        if renames is not None:
            back = {new: old for old, new in renames.items()}
            renamed = _rename_inner(inner, back)
            if renamed is None:
                unplaced.append(key)
                continue
            inner = renamed
        out[f"{module}.{inner}"] = value
    if unplaced:
        raise CheckpointError(f"{what}: {len(unplaced)} weights have no place in the single-file layout "
                              f"({_preview(unplaced)})")
    return out


def unet_to_ldm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel state dict -> LDM UNet keys (without ``model.diffusion_model.``)."""
    return _invert_modules(state, unet_module_table(config), "UNet")


def vae_to_ldm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL state dict -> LDM VAE keys (without ``first_stage_model.``); attention back to 1x1 convs."""
    out = _invert_modules(state, _vae_modules(config), "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def clip_to_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel state dict -> the embedded transformers keys LDM files use (``text_model.``)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items() if not k.startswith("text_projection")}


def openclip_to_ldm(state: Mapping[str, Any], *, extra_layer: bool = False) -> dict[str, Any]:
    """CLIPTextModel(WithProjection) state dict -> OpenCLIP text tower keys. ``extra_layer``: repeat the last
    resblock once more, as SD 2.x files carry OpenCLIP-H's 24th block, which SD 2.x (penultimate layer) skips."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    inverse_top = {v.removeprefix("text_model."): k for k, v in _OPENCLIP_TOP.items()}
    inverse_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, Any] = {}
    layers = 0
    for key, value in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(np.asarray(value).T)
        elif key.startswith("encoder.layers."):
            layer, _, inner = key.removeprefix("encoder.layers.").partition(".")
            layers = max(layers, int(layer) + 1)
            module, _, leaf = inner.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue  # fused below
            out[f"transformer.resblocks.{layer}.{inverse_layer[module]}.{leaf}"] = value
        else:
            raise CheckpointError(f"OpenCLIP text encoder: no place for {key} in the single-file layout")
    for n in range(layers):
        for leaf in ("weight", "bias"):
            parts = [np.asarray(state[f"encoder.layers.{n}.self_attn.{p}_proj.{leaf}"]) for p in "qkv"]
            out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = np.concatenate(parts, axis=0)
    if extra_layer and layers:
        last = f"transformer.resblocks.{layers - 1}."
        out.update({k.replace(last, f"transformer.resblocks.{layers}."): v for k, v in list(out.items())
                    if k.startswith(last)})
    return out


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
