"""diffusers-format folders: ``model_index.json`` plus one sub-folder per component.

Weights may be ``.safetensors`` (read without torch), sharded (``*.safetensors.index.json``), ``fp16``
variants, or pickled ``.bin`` files (read only through torch's weights-only loader, when torch is installed).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.config import ConfigError, read_json
from sdjax.convert.architecture import infer_text_encoder_config, infer_unet_config, infer_vae_config
from sdjax.convert.safe_load import CheckpointError, read_state_dict
from sdjax.loaders.assemble import build_pipeline, convert_components
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


def _family(folder: Path, state_dicts: Mapping[str, Mapping[str, Any]]) -> str:
    """The shipped family whose configs are the defaults for components without a usable config.json: SDXL by
    its addition embedding, SD 2.x by its OpenCLIP tokenizer (pads with "!") or its 1024-wide context."""
    unet = state_dicts.get("unet", {})
    if "add_embedding.linear_1.weight" in unet:
        return "sdxl" if "text_encoder" in state_dicts else "sdxl_refiner"
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    if tokenizer.is_file() and read_json(tokenizer).get("pad_token") == "!":
        return "sd2"
    width = next((v.shape[1] for k, v in sorted(unet.items()) if k.endswith("attn2.to_k.weight")), 768)
    return "sd2" if width == 1024 else "sd1"


def _inferred(name: str, kind: str, state: Mapping[str, Any], defaults: dict[str, Any], family: str):
    if kind == "unet":
        return infer_unet_config(state, defaults, family)
    if kind == "vae":
        return infer_vae_config(state, defaults)
    return infer_text_encoder_config(state, defaults)


def _configs_from_weights(
    folder: Path, components: Mapping[str, str], configs: dict[str, dict[str, Any] | None],
    state_dicts: dict[str, dict[str, np.ndarray]], explicit: set[str],
) -> dict[str, dict[str, Any]]:
    """Each model component's config: explicit ones as given; a missing config.json, or one the weights do not
    fit, replaced by one read from the weights (with a warning naming the fields the weights corrected)."""
    from sdjax.convert.single_file import config_dir

    family = _family(folder, state_dicts)
    shipped = config_dir(family)
    out: dict[str, dict[str, Any]] = {}
    for name, kind in components.items():
        if kind not in ("unet", "vae", "clip"):
            continue
        config = configs.get(name)
        if config is not None and (name in explicit or _fits(name, config, state_dicts[name])):
            out[name] = config
            continue
        default_file = shipped / name / "config.json"
        defaults = config if config is not None else read_json(default_file) if default_file.is_file() else {}
        try:
            inferred = _inferred(name, kind, state_dicts[name], defaults, family)
        except ConfigError:
            if config is None:
                raise
            out[name] = config  # the weights say nothing usable: keep the config and let conversion report
            continue
        if config is None:
            warnings.warn(f"{folder / name}: no config.json; read the architecture from the weights "
                          f"({family} conventions for the rest)", stacklevel=4)
        elif _fits(name, inferred, state_dicts[name]):
            changed = sorted(k for k in inferred if inferred.get(k) != config.get(k))
            warnings.warn(f"{folder / name}/config.json does not fit the weights; corrected from the weights: "
                          f"{', '.join(changed)}", stacklevel=4)
        else:
            inferred = config  # neither fits: keep the file's config so the error names its mismatches
        out[name] = inferred
    return out


def _fits(name: str, config: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    """Whether the weights convert under ``config`` (no dtype cast: the arrays are only viewed, not copied)."""
    from sdjax.convert.weights import WeightMismatchError

    try:
        convert_components({name: dict(config)}, {name: dict(state)}, dtype=None)
    except (WeightMismatchError, ConfigError):
        return False
    return True


def load_diffusers_folder(folder: Path, *, dtype: Any = jnp.float32, variant: str | None = None,
                          configs: Mapping[str, Mapping[str, Any]] | None = None) -> Pipeline:
    """A Pipeline from a diffusers folder. ``configs``: component name -> config dict that replaces the folder's
    own; components whose config.json is missing or does not fit their weights get one read from the weights."""
    index = read_model_index(folder)
    components = pipeline_components(index)
    found: dict[str, dict[str, Any] | None] = {}
    state_dicts: dict[str, dict[str, np.ndarray]] = {}
    for name, kind in components.items():
        if kind in ("unet", "vae", "clip"):
            file = folder / name / "config.json"
            found[name] = read_json(file) if file.is_file() else None
            state_dicts[name] = read_component_weights(folder / name, variant=variant)
    overrides = dict(configs or {})
    scheduler = dict(overrides.pop("scheduler", None) or {})
    found.update({name: dict(config) for name, config in overrides.items() if name in found})
    model_configs = _configs_from_weights(folder, components, found, state_dicts, set(overrides) & set(found))
    if "scheduler" not in components:
        raise ConfigError(f"{folder}: model_index.json lists no scheduler")
    tokenizer_folders = {
        name: folder / TOKENIZER_FOR[name] if TOKENIZER_FOR[name] in components else None
        for name in TEXT_ENCODERS
    }
    return build_pipeline(
        configs=model_configs,
        state_dicts=state_dicts,
        scheduler_config=scheduler or read_json(folder / "scheduler" / "scheduler_config.json"),
        tokenizer_folders=tokenizer_folders,
        dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        source=str(folder),
    )
