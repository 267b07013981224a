"""Single-file checkpoints (CompVis / A1111 / ComfyUI layouts) -> Pipeline.

The layouts themselves (family detection, LDM -> diffusers renaming) live in ``sdjax.convert.single_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax.config import read_json
from sdjax.convert.single_file import config_dir, load_single_file
from sdjax.loaders.assemble import build_pipeline
from sdjax.pipeline import Pipeline


def load_single_file_pipeline(path: Path, *, dtype: Any = jnp.float32, prediction_type: str | None = None,
                              configs: Any = None) -> Pipeline:
    """A Pipeline from one .safetensors / .ckpt file in the CompVis / A1111 / ComfyUI layout."""
    model = load_single_file(path, prediction_type=prediction_type, configs=configs)
    index = read_json(config_dir(model.config_name) / "model_index.json")
    return build_pipeline(
        configs=model.configs,
        state_dicts=model.components,
        scheduler_config=model.scheduler_config,
        tokenizer_folders={},
        tokenizer_conventions=model.tokenizers,
        dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        source=str(path),
    )
