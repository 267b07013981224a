"""Checkpoint merging as AUTOMATIC1111's checkpoint merger does it.

Weighted sum: ``(1 - alpha) * A + alpha * B``. Add difference: ``A + (B - C) * alpha`` (e.g. B an inpainting or
fine-tuned model, C the base it was trained from). Every weight of every component is merged in float32 and cast
back to A's dtype; configs, tokenizers and scheduler come from A. The models must have one architecture: the
same components with the same weight shapes.

``sdjax merge A B OUT --alpha 0.3 [--subtract C] [--format sdjax|safetensors]`` writes the result atomically, as an
sdjax checkpoint or a single .safetensors file in the original (LDM / A1111) layout, with the recipe in its
metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sdjax.convert.weights import flatten, unflatten
from sdjax.pipeline import Pipeline

FORMATS = ("sdjax", "safetensors")
RECIPE_KEY = "sdjax_merge_recipe"


class MergeError(ValueError):
    """Two models that cannot be merged (different components or weight shapes)."""


def recipe(a: Any, b: Any, *, alpha: float, subtract: Any = None) -> dict[str, Any]:
    """The merge as data: what went in and how (written into the output's metadata)."""
    names = {"A": str(a.source if isinstance(a, Pipeline) else a), "B": str(b.source if isinstance(b, Pipeline)
                                                                          else b)}
    if subtract is not None:
        names["C"] = str(subtract.source if isinstance(subtract, Pipeline) else subtract)
    method = "add_difference" if subtract is not None else "weighted_sum"
    formula = "A + (B - C) * alpha" if subtract is not None else "(1 - alpha) * A + alpha * B"
    return {"method": method, "formula": formula, "alpha": float(alpha), **names}


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    return alpha


def _check_same_architecture(a: Pipeline, b: Pipeline, what: str) -> None:
    if set(a.params) != set(b.params):
        raise MergeError(f"A and {what} have different components: {sorted(a.params)} vs {sorted(b.params)}")
    for name in a.params:
        fa, fb = flatten(a.params[name]), flatten(b.params[name])
        missing, extra = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
        shapes = [f"{'/'.join(k)} {tuple(np.shape(fa[k]))} vs {tuple(np.shape(fb[k]))}"
                  for k in fa if k in fb and np.shape(fa[k]) != np.shape(fb[k])]
        if missing or extra or shapes:
            problems = []
            if missing:
                problems.append(f"{len(missing)} weights only in A ({', '.join('/'.join(k) for k in missing[:3])})")
            if extra:
                problems.append(f"{len(extra)} only in {what} ({', '.join('/'.join(k) for k in extra[:3])})")
            if shapes:
                problems.append(f"{len(shapes)} of other shapes ({'; '.join(shapes[:3])})")
            raise MergeError(f"A and {what} are different architectures: their {name} differs: "
                             + ", ".join(problems) + _config_differences(a, b, name))


def _config_differences(a: Pipeline, b: Pipeline, name: str) -> str:
    def config(pipe: Pipeline) -> Any:
        if name == "unet":
            return pipe.unet.config
        if name == "vae":
            return pipe.vae.config
        return pipe.text_encoders[name].config

    ca, cb = dataclasses.asdict(config(a)), dataclasses.asdict(config(b))
    changed = [f"{k} {ca[k]!r} vs {cb[k]!r}" for k in ca if ca[k] != cb.get(k)]
    return f" (config: {'; '.join(changed[:6])})" if changed else ""


def merge_params(a: Any, b: Any, alpha: float, c: Any = None) -> Any:
    """One params pytree merged leaf by leaf (float32 arithmetic, A's dtype back)."""
    def combine(x: Any, y: Any, z: Any = None) -> np.ndarray:
        x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
        out = x32 + (y32 - np.asarray(z, np.float32)) * alpha if z is not None else (1 - alpha) * x32 + alpha * y32
        return out.astype(np.asarray(x).dtype)

    fa, fb = flatten(a), flatten(b)
    fc = flatten(c) if c is not None else None
    return unflatten({k: combine(fa[k], fb[k], fc[k] if fc is not None else None) for k in fa})


def merge(a: str | Path | Pipeline, b: str | Path | Pipeline, *, alpha: float,
          subtract: str | Path | Pipeline | None = None, **load_options: Any) -> Pipeline:
    """Merge two models (paths or loaded Pipelines): weighted sum, or add difference with ``subtract``.

    ``load_options`` go to :func:`sdjax.load` for the paths (e.g. ``config=`` for single files). The result is
    a Pipeline with A's configs, tokenizers and scheduler; its ``source`` is the recipe as JSON.
    """
    from sdjax.loaders import load

    alpha = _check_alpha(alpha)
    spec = recipe(a, b, alpha=alpha, subtract=subtract)
    pipes = [p if isinstance(p, Pipeline) else load(p, **load_options) for p in (a, b, subtract) if p is not None]
    first, second = pipes[0], pipes[1]
    _check_same_architecture(first, second, "B")
    third = pipes[2] if len(pipes) == 3 else None
    if third is not None:
        _check_same_architecture(first, third, "C")
    params = {name: merge_params(first.params[name], second.params[name], alpha,
                                 third.params[name] if third is not None else None) for name in first.params}
    return first.replace(params=params, source=json.dumps(spec, sort_keys=True))


def family(pipe: Pipeline) -> str:
    """The single-file family of a loaded model (which text-encoder layout and prefixes to write)."""
    inpaint = "_inpaint" if pipe.unet.config.in_channels == 9 else ""
    if pipe.is_sdxl:
        return "sdxl" + inpaint if "text_encoder" in pipe.text_encoders else "sdxl_refiner"
    return ("sd2" if pipe.text_encoders["text_encoder"].config.hidden_act == "gelu" else "sd1") + inpaint


def save_single_file(pipe: Pipeline, out: str | Path, *, metadata: dict[str, str] | None = None,
                     force: bool = False) -> Path:
    """Write ``pipe`` as one .safetensors file in the original layout, atomically (a temporary file beside OUT
    renamed into place when complete)."""
    from safetensors.numpy import save_file

    from sdjax.convert.single_file import to_single_file
    from sdjax.loaders.sdjax_format import component_configs, torch_state_dict

    out = Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    configs = component_configs(pipe)
    components = {name: torch_state_dict(params, conv_projections=name == "unet"
                                         and not pipe.unet.config.use_linear_projection)
                  for name, params in pipe.params.items()}
    state = to_single_file(family(pipe), components, configs)
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_merged(pipe: Pipeline, out: str | Path, *, format: str = "sdjax", dtype: str | None = None,
                 force: bool = False) -> Path:
    """Write a :func:`merge` result with its recipe: an sdjax checkpoint, or a single .safetensors file."""
    from sdjax.loaders.sdjax_format import save_checkpoint

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    spec = pipe.source
    if format == "sdjax":
        return save_checkpoint(pipe, out, dtype=dtype, force=force, metadata={RECIPE_KEY: json.loads(spec)})
    if dtype is not None:
        from sdjax.loaders.sdjax_format import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        pipe = pipe.replace(params=jax.tree.map(lambda x: np.asarray(x).astype(DTYPES[dtype]), pipe.params))
    return save_single_file(pipe, out, metadata={RECIPE_KEY: spec}, force=force)
