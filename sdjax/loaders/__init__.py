"""Loading: ``load()`` takes any checkpoint format and dispatches to the loader of that format.

=====================================  =====================================================================
``diffusers_folder``                   diffusers folders (``model_index.json`` + component folders)
``single_file``                        one .safetensors / .ckpt in the CompVis / A1111 / ComfyUI layout
``sdjax_format``                       sdjax checkpoints (orbax params + configs), and export to diffusers
``assemble``                           component configs + weights -> Pipeline (shared by all of them)
=====================================  =====================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax.convert.single_file import read_config_overrides
from sdjax.loaders.assemble import assemble, build_pipeline, vae_param_dtype
from sdjax.loaders.diffusers_folder import load_diffusers_folder
from sdjax.loaders.sdjax_format import is_sdjax_checkpoint, load_checkpoint
from sdjax.loaders.single_file import load_single_file_pipeline
from sdjax.pipeline import Pipeline

__all__ = ["DEFAULT_MODEL", "assemble", "build_pipeline", "load", "load_diffusers_folder",
           "load_single_file_pipeline", "vae_param_dtype"]

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def load(
    path: str | Path | None = None,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    prediction_type: str | None = None,
    config: str | Path | Mapping[str, Mapping[str, Any]] | None = None,
    vae: str | Path | None = None,
    unet: str | Path | None = None,
    preset: str | None = None,
) -> Pipeline:
    """Load a model: a diffusers folder, a single-file checkpoint (.safetensors / .ckpt), or an sdjax
    checkpoint folder. With no path, the small default model embedded in sdjax.

    ``dtype``: params and compute dtype (float32, bfloat16, float16); sampler arithmetic stays float32 and a
    VAE marked ``force_upcast`` keeps float32. ``variant``: e.g. "fp16" to pick ``*.fp16.safetensors``
    (by default the full-precision files, falling back to fp16 ones). ``prediction_type`` overrides the
    scheduler's (e.g. "v_prediction" for SD 2.x 768-v single files; it wins over a preset's).

    ``config``: a diffusers-layout folder (``unet/config.json`` ...) or a mapping component -> config dict whose
    configs replace the model's own (single files: the shipped family configs and the architecture read from
    the weights; diffusers folders: their config.json files).

    ``vae``: another VAE (A1111 / ComfyUI file, diffusers file or folder; see ``sdjax.loaders.components``).
    ``unet``: another UNet, e.g. SDXL-Lightning's ``sdxl_lightning_4step_unet.safetensors`` onto SDXL base.
    ``preset``: a few-step preset's scheduler settings (``sdjax.presets.PRESETS``, e.g. "sdxl-lightning-4step").
    """
    from sdjax.loaders.components import with_unet, with_vae

    if preset is not None:
        from sdjax.presets import get_preset

        get_preset(preset)  # an unknown name fails before any work
    folder = DEFAULT_MODEL if path is None else Path(path)
    for what, extra in (("model", folder), ("vae", vae), ("unet", unet)):
        if extra is not None and not Path(extra).exists():
            raise FileNotFoundError(f"no {what} at {extra}")
    if not folder.is_dir():
        pipe = load_single_file_pipeline(folder, dtype=dtype, prediction_type=prediction_type, configs=config)
    elif is_sdjax_checkpoint(folder):
        if config is not None:
            raise ValueError("config= does not apply to an sdjax checkpoint (it stores its own configs)")
        pipe = load_checkpoint(folder, dtype=dtype)
    else:
        pipe = load_diffusers_folder(folder, dtype=dtype, variant=variant, configs=read_config_overrides(config))
    if unet is not None:
        pipe = with_unet(pipe, unet)
    if vae is not None:
        pipe = with_vae(pipe, vae)
    if preset is not None:
        pipe = pipe.with_preset(preset)
    if prediction_type is not None:
        pipe = pipe.replace(scheduler=dataclasses.replace(pipe.scheduler, prediction_type=prediction_type))
    return pipe
