"""Small models on disk (the shipped classifiers): one safetensors file of flat ``a/b/kernel`` keys beside the
model's ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.weights import flatten, unflatten

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_params(params: Any, config: dict[str, Any], folder: str | Path, *, dtype: Any = np.float32) -> Path:
    """``params`` (nested dicts) stored as ``dtype`` and ``config`` as JSON in ``folder``."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(path): np.ascontiguousarray(np.asarray(value, dtype))
            for path, value in flatten(jax.device_get(params)).items()}
    save_file(flat, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_config(folder: str | Path, what: str) -> dict[str, Any]:
    """The config a :func:`save_params` folder holds (``what`` names the model in errors)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no {what} here (needs {CONFIG} and {WEIGHTS})")
    return json.loads((folder / CONFIG).read_text())


def load_params(folder: str | Path, init: Callable[[jax.Array], Any], what: str) -> dict[str, Any]:
    """The float32 params of a :func:`save_params` folder, checked leaf by leaf against ``init(key)``'s shapes."""
    from safetensors.numpy import load_file

    flat = load_file(str(Path(folder) / WEIGHTS))
    params = unflatten({tuple(key.split("/")): jnp.asarray(value, jnp.float32) for key, value in flat.items()})
    shapes = jax.eval_shape(init, jax.random.key(0))
    expected = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    got = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:
        raise ValueError(f"{folder}: {what} weights do not match its config")
    return params
