"""Component configs + weights -> a :class:`sdjax.pipeline.Pipeline`: the last step of every loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from sdjax.config import ConfigError
from sdjax.convert.clip import architectures_have_projection, convert_clip_text, has_projection
from sdjax.convert.unet import convert_unet
from sdjax.convert.vae import convert_vae
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.pipeline import TEXT_ENCODERS, Pipeline, TextEncoder
from sdjax.samplers.schedules import SchedulerConfig
from sdjax.tokenizer import load_tokenizer


def tokenizer_convention(name: str, config: CLIPTextConfig) -> str:
    # SD1 and SDXL's first encoder are OpenAI CLIP (quick_gelu, pads with <|endoftext|>); SD2's encoder and
    # SDXL's second are OpenCLIP (gelu, pads with "!").
    return "openclip" if name == "text_encoder_2" or config.hidden_act == "gelu" else "clip"


def vae_param_dtype(config: VAEConfig, dtype: Any) -> Any:
    # A VAE that needs float32 (force_upcast) keeps float32 params whatever the pipeline dtype.
    return jnp.float32 if config.force_upcast else dtype


def assemble(
    *,
    configs: dict[str, dict[str, Any]],
    params: dict[str, Any],
    scheduler_config: dict[str, Any],
    tokenizers: dict[str, CLIPTokenizer],
    projections: dict[str, bool],
    dtype: Any = jnp.float32,
    force_zeros_for_empty_prompt: bool = False,
    requires_aesthetics_score: bool = False,
    source: str = "",
) -> Pipeline:
    """A Pipeline from component config dicts and params already in sdjax's layout."""
    for needed in ("unet", "vae"):
        if needed not in params:
            raise ConfigError(f"{source}: the model has no {needed}")
    vae_config = VAEConfig.from_dict(configs["vae"])
    text_encoders = {
        name: TextEncoder(CLIPTextModel(CLIPTextConfig.from_dict(configs[name]), with_projection=projections[name],
                                        dtype=dtype), tokenizers[name])
        for name in TEXT_ENCODERS if name in params
    }
    if not text_encoders:
        raise ConfigError(f"{source}: the model has no text encoder")
    return Pipeline(
        unet=UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), dtype=dtype),
        vae=AutoencoderKL(vae_config, dtype=vae_param_dtype(vae_config, dtype)),
        text_encoders=text_encoders,
        params=params,
        scheduler=SchedulerConfig.from_dict(scheduler_config),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        requires_aesthetics_score=requires_aesthetics_score,
        source=source,
    )


def convert_components(
    configs: dict[str, dict[str, Any]], state_dicts: dict[str, dict[str, np.ndarray]], *, dtype: Any = jnp.float32,
) -> tuple[dict[str, Any], dict[str, bool]]:
    """Component state dicts (PyTorch naming and layout) -> sdjax params, and which text encoders project."""
    params: dict[str, Any] = {}
    if "unet" in state_dicts:
        params["unet"] = convert_unet(state_dicts["unet"], UNetConfig.from_dict(configs["unet"]), dtype=dtype)
    if "vae" in state_dicts:
        vae_config = VAEConfig.from_dict(configs["vae"])
        params["vae"] = convert_vae(state_dicts["vae"], vae_config, dtype=vae_param_dtype(vae_config, dtype))
    projections = {}
    for name in TEXT_ENCODERS:
        if name not in state_dicts:
            continue
        config = CLIPTextConfig.from_dict(configs[name])
        projections[name] = has_projection(state_dicts[name]) or architectures_have_projection(configs[name])
        params[name] = convert_clip_text(state_dicts[name], config, with_projection=projections[name], dtype=dtype)
    return params, projections


def build_pipeline(
    *,
    configs: dict[str, dict[str, Any]],
    state_dicts: dict[str, dict[str, np.ndarray]],
    scheduler_config: dict[str, Any],
    tokenizer_folders: dict[str, Path | None],
    tokenizer_conventions: dict[str, str] | None = None,
    dtype: Any = jnp.float32,
    source: str = "",
    **flags: Any,
) -> Pipeline:
    """Convert component state dicts (PyTorch naming and layout) into a Pipeline.

    Tokenizers come from ``tokenizer_folders`` when a folder has its own files, else from sdjax's shipped
    vocabulary with the convention given (or guessed from the encoder: OpenCLIP towers use gelu).
    """
    for needed in ("unet", "vae"):
        if needed not in state_dicts:
            raise ConfigError(f"{source}: the model has no {needed}")
    params, projections = convert_components(configs, state_dicts, dtype=dtype)
    tokenizers = {}
    for name in projections:
        convention = (tokenizer_conventions or {}).get(name) or tokenizer_convention(
            name, CLIPTextConfig.from_dict(configs[name]))
        tokenizers[name] = load_tokenizer(tokenizer_folders.get(name), convention=convention)
    return assemble(configs=configs, params=params, scheduler_config=scheduler_config, tokenizers=tokenizers,
                    projections=projections, dtype=dtype, source=source, **flags)
