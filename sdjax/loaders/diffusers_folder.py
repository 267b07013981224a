"""diffusers-format folders: ``model_index.json`` plus one sub-folder per component.

Weights may be ``.safetensors`` (read without torch), sharded (``*.safetensors.index.json``), ``fp16``
variants, or pickled ``.bin`` files (read only through torch's weights-only loader, when torch is installed).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.convert.safe_load import CheckpointError, read_state_dict
from sdjax.loaders.assemble import build_pipeline
from sdjax.models.config import ConfigError, read_json
from sdjax.pipeline import TEXT_ENCODERS, TOKENIZER_FOR, Pipeline

# Component classes sdjax builds, by model_index.json class name.
MODEL_CLASSES = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "CLIPTokenizer": "tokenizer",
    "CLIPTokenizerFast": "tokenizer",
}
# Components a pipeline may list that take no part in generating images; skipped with a note.
SKIPPED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_model_index(folder: Path) -> dict[str, Any]:
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise FileNotFoundError(
            f"{folder} is not a diffusers model folder (no model_index.json); "
            "for a single-file checkpoint pass the .safetensors/.ckpt file itself"
        )
    return read_json(index_path)


def pipeline_components(index: dict[str, Any]) -> dict[str, str]:
    """Component name -> sdjax kind ('unet', 'vae', 'clip', 'tokenizer', 'scheduler')."""
    components: dict[str, str] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if class_name is None or name in SKIPPED_COMPONENTS:
            continue
        if name == "scheduler":
            components[name] = "scheduler"
        elif class_name in MODEL_CLASSES:
            components[name] = MODEL_CLASSES[class_name]
        else:
            raise ConfigError(
                f"model_index.json: component {name!r} is a {library}.{class_name}, which sdjax does not support")
    return components


def _candidate_files(folder: Path, variant: str | None) -> list[list[Path]]:
    """Weight file sets in order of preference; each set is one checkpoint (several files when sharded)."""
    variants = [variant] if variant else [None, "fp16"]
    sets: list[list[Path]] = []
    for v in variants:
        for ext in ("safetensors", "bin"):
            for stem in _WEIGHT_STEMS:
                name = f"{stem}.{v}.{ext}" if v else f"{stem}.{ext}"
                if (folder / name).exists():
                    sets.append([folder / name])
                index = folder / f"{name}.index.json"
                if index.exists():
                    weight_map = json.loads(index.read_text()).get("weight_map", {})
                    sets.append([folder / f for f in sorted(set(weight_map.values()))])
    return sets


def read_component_weights(folder: Path, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of one component folder, as numpy arrays in PyTorch layout and naming."""
    sets = _candidate_files(folder, variant)
    if not sets:
        wanted = f"variant {variant!r} " if variant else ""
        raise CheckpointError(f"no {wanted}weights found in {folder} (looked for *.safetensors, sharded index, *.bin)")
    files = sets[0]
    if variant is None and ".fp16." in files[0].name:
        warnings.warn(f"{folder.name}: only fp16 weights found, loading {files[0].name}", stacklevel=3)
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"shard {file} named in the index file is missing")
        state_dict.update(read_state_dict(file))
    return state_dict


def load_diffusers_folder(folder: Path, *, dtype: Any = jnp.float32, variant: str | None = None) -> Pipeline:
    index = read_model_index(folder)
    components = pipeline_components(index)
    configs: dict[str, dict[str, Any]] = {}
    state_dicts: dict[str, dict[str, np.ndarray]] = {}
    for name, kind in components.items():
        if kind in ("unet", "vae", "clip"):
            configs[name] = read_json(folder / name / "config.json")
            state_dicts[name] = read_component_weights(folder / name, variant=variant)
    if "scheduler" not in components:
        raise ConfigError(f"{folder}: model_index.json lists no scheduler")
    tokenizer_folders = {
        name: folder / TOKENIZER_FOR[name] if TOKENIZER_FOR[name] in components else None
        for name in TEXT_ENCODERS
    }
    return build_pipeline(
        configs=configs,
        state_dicts=state_dicts,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        tokenizer_folders=tokenizer_folders,
        dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        source=str(folder),
    )
