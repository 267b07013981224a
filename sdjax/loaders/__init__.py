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
from pathlib import Path
from typing import Any

import jax.numpy as jnp

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
    config: str | Path | None = None,
) -> Pipeline:
    """Load a model: a diffusers folder, a single-file checkpoint (.safetensors / .ckpt), or an sdjax
    checkpoint folder. With no path, the small default model embedded in sdjax.

    ``dtype``: params and compute dtype (float32, bfloat16, float16); sampler arithmetic stays float32 and a
    VAE marked ``force_upcast`` keeps float32. ``variant``: e.g. "fp16" to pick ``*.fp16.safetensors``
    (by default the full-precision files, falling back to fp16 ones). ``prediction_type`` overrides the
    scheduler's (e.g. "v_prediction" for SD 2.x 768-v single files). ``config``: for single files, a
    diffusers-layout folder whose component configs replace the shipped ones of the detected family.
    """
    folder = DEFAULT_MODEL if path is None else Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no model at {folder}")
    if not folder.is_dir():
        return load_single_file_pipeline(folder, dtype=dtype, prediction_type=prediction_type, configs=config)
    if is_sdjax_checkpoint(folder):
        pipe = load_checkpoint(folder, dtype=dtype)
    else:
        pipe = load_diffusers_folder(folder, dtype=dtype, variant=variant)
    if prediction_type is not None:
        pipe = pipe.replace(scheduler=dataclasses.replace(pipe.scheduler, prediction_type=prediction_type))
    return pipe
