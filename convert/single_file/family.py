"""Single-file families: which architecture a state dict holds, its key prefixes and text encoders, the
prediction-type rule, and the shipped config folders."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.single_file.common import _describe_prefixes, _has_prefix

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
