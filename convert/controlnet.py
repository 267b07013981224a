"""ControlNet checkpoints -> sdjax ``ControlNetModel`` params.

Three layouts: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``), a diffusers
state dict in a single file, and A1111's / lllyasviel's control files (``control_v11p_sd15_canny.pth``,
``.safetensors``): the LDM ``ControlNet`` layout, keys under ``control_model.`` (or bare, as thibaud's SD 2.1
files), ``input_hint_block``, ``zero_convs``, ``middle_block_out``. Pickles are read through the weights-only
loader (:mod:`sdjax.convert.safe_load`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sdjax.convert.safe_load import CheckpointError, read_state_dict
from sdjax.convert.single_file.common import _rename_modules
from sdjax.convert.single_file.unet import _UNET_RESNET, unet_module_table
from sdjax.convert.weights import Params, to_flax_params
from sdjax.models.config import read_json
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel, example_inputs

LDM_PREFIX = "control_model."
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# The released ControlNets' diffusers configs, for LDM control files (which carry none); picked by context width.
_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
LDM_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8, "down_block_types": _SD_DOWN},
    "sd21": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
             "upcast_attention": True, "down_block_types": _SD_DOWN},
    "sdxl": {"cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
}
_CONTEXT_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_CONTEXT_KEY = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


@functools.cache
def controlnet_param_shapes(config: ControlNetConfig) -> Params:
    """The params tree of ``ControlNetModel(config)`` as ``jax.ShapeDtypeStruct`` leaves (read-only, cached)."""
    args, kwargs = example_inputs(config, time_ids=1)
    return jax.eval_shape(lambda: ControlNetModel(config).init(jax.random.key(0), *args, **kwargs))["params"]


def convert_controlnet(state_dict: Mapping[str, Any], config: ControlNetConfig | Mapping[str, Any], *,
                       dtype: Any = None) -> Params:
    """A diffusers ControlNetModel state dict, or an LDM control file's, onto sdjax params (numpy arrays)."""
    config = config if isinstance(config, ControlNetConfig) else ControlNetConfig.from_dict(config)
    if is_ldm_controlnet(state_dict):
        state_dict = ldm_to_diffusers(state_dict, config)
    return to_flax_params(state_dict, controlnet_param_shapes(config), dtype=dtype, what="ControlNet")


def is_ldm_controlnet(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(LDM_PREFIX + "input_hint_block.") or k.startswith("input_hint_block.")
               for k in state_dict)


def ldm_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers config of a released ControlNet family, read off an LDM control file's shapes."""
    weights = _strip_ldm_prefix(state_dict)
    hint = weights.get("input_hint_block.0.weight")
    conditioning = {} if hint is None else {"conditioning_channels": int(hint.shape[1])}
    if "label_emb.0.0.weight" in weights:
        return dict(LDM_CONFIGS["sdxl"], **conditioning)
    key = weights.get(_CONTEXT_KEY)
    width = None if key is None else int(key.shape[1])
    for name in ("sd15", "sd21"):
        if LDM_CONFIGS[name]["cross_attention_dim"] == width:
            return dict(LDM_CONFIGS[name], **conditioning)
    raise CheckpointError(f"cannot tell this control file's model family (cross-attention width {width}); "
                          "pass config= (a diffusers ControlNet config.json or dict)")


def ldm_to_diffusers(state_dict: Mapping[str, Any], config: ControlNetConfig) -> dict[str, Any]:
    """LDM ControlNet keys -> diffusers ControlNetModel keys (every key placed, every module found)."""
    weights = _strip_ldm_prefix(state_dict)
    unet = config.unet_config
    raw = {"in_channels": unet.in_channels, "down_block_types": list(unet.down_block_types),
           "up_block_types": list(unet.up_block_types), "layers_per_block": unet.layers_per_block,
           "addition_embed_type": unet.addition_embed_type}
    modules = {k: v for k, v in unet_module_table(raw).items()
               if not k.startswith(("output_blocks.", "out."))}
    if config.mid_block_type != "UNetMidBlock2DCrossAttn":
        modules = {k: v for k, v in modules.items() if k not in ("middle_block.1", "middle_block.2")}
        modules["middle_block.0"] = ("mid_block.resnets.0", _UNET_RESNET)
    n_levels = len(config.conditioning_embedding_out_channels)
    # input_hint_block: conv, SiLU, (conv, SiLU, conv, SiLU) per level, conv: convs at even indices.
    modules["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", None)
    for i in range(2 * (n_levels - 1)):
        modules[f"input_hint_block.{2 * (i + 1)}"] = (f"controlnet_cond_embedding.blocks.{i}", None)
    modules[f"input_hint_block.{2 * (2 * n_levels - 1)}"] = ("controlnet_cond_embedding.conv_out", None)
    for i in range(config.num_down_residuals):
        modules[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", None)
    modules["middle_block_out.0"] = ("controlnet_mid_block", None)
    return _rename_modules(weights, modules, "ControlNet")


def _strip_ldm_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The control model's keys: under ``control_model.`` when present (old files also carry the whole SD model,
    which is ignored), else the file as it is."""
    if any(k.startswith(LDM_PREFIX) for k in state_dict):
        return {k[len(LDM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_PREFIX)}
    return dict(state_dict)


def read_controlnet(path: str | os.PathLike, config: str | os.PathLike | Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, raw diffusers config) from a diffusers folder, a diffusers-layout file or an LDM control file.

    ``config``: a config.json path, a folder holding one, or a dict; needed for a diffusers-layout single file
    without a ``config.json`` beside it, optional for LDM files of the released families.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_FILES)} in this ControlNet folder")
        raw = _raw_config(config) if config is not None else read_json(path / "config.json")
        return read_state_dict(weights), raw
    if not path.exists():
        raise CheckpointError(f"{path}: no such ControlNet file or folder")
    state = read_state_dict(path)
    if config is not None:
        return state, _raw_config(config)
    if is_ldm_controlnet(state):
        return state, ldm_config(state)
    beside = path.parent / "config.json"
    if beside.is_file():
        return state, read_json(beside)
    raise CheckpointError(f"{path}: a diffusers-layout ControlNet file needs its config.json (pass config=)")


def _raw_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    config = Path(config)
    return read_json(config / "config.json" if config.is_dir() else config)
