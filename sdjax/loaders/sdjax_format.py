"""sdjax checkpoints (orbax params + JSON configs + tokenizer files) and export back to diffusers folders.

An sdjax checkpoint folder::

    sdjax_model.json            format marker, flags, which text encoders have a projection
    params/                     the whole params pytree, written by orbax-checkpoint
    unet/config.json, vae/config.json, text_encoder*/config.json, scheduler/scheduler_config.json
    tokenizer/, tokenizer_2/    the tokenizers' own files

Loading one needs neither torch nor the original checkpoint. Writing is atomic: everything goes to a
temporary folder beside OUT, renamed into place only when complete, so an interrupted write leaves no OUT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import ConfigError, read_json
from sdjax.convert.weights import flatten, from_flax_params, host_array, path_to_torch_key
from sdjax.loaders.assemble import assemble, vae_param_dtype
from sdjax.pipeline import TEXT_ENCODERS, TOKENIZER_FOR, Pipeline

MARKER = "sdjax_model.json"
FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def is_sdjax_checkpoint(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


@contextlib.contextmanager
def atomic_folder(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block finishes without error."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700 folders; OUT gets the usual permissions
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def component_configs(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    """config.json dicts of every component, in diffusers / transformers form."""
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", **dataclasses.asdict(pipe.unet.config)},
        "vae": {"_class_name": "AutoencoderKL", **dataclasses.asdict(pipe.vae.config)},
    }
    for name, encoder in pipe.text_encoders.items():
        arch = "CLIPTextModelWithProjection" if encoder.module.with_projection else "CLIPTextModel"
        configs[name] = {"architectures": [arch], "model_type": "clip_text_model",
                         **dataclasses.asdict(encoder.config)}
    return configs


def _write_configs(pipe: Pipeline, folder: Path) -> None:
    for name, config in component_configs(pipe).items():
        _write_json(folder / name / "config.json", config)
    scheduler = {"_class_name": "EulerDiscreteScheduler", **dataclasses.asdict(pipe.scheduler)}
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    for name, encoder in pipe.text_encoders.items():
        encoder.tokenizer.save_pretrained(str(folder / TOKENIZER_FOR[name]))


def save_checkpoint(pipe: Pipeline, out: str | Path, *, dtype: str | None = None, force: bool = False,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``pipe`` as an sdjax checkpoint; ``dtype`` ("float32", "bfloat16", "float16") casts the params.
    ``metadata``: extra JSON-able entries for the marker file (e.g. a merge recipe)."""
    import orbax.checkpoint as ocp

    params = pipe.params
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        # As when loading: a force_upcast VAE stays float32.
        targets = {name: vae_param_dtype(pipe.vae.config, DTYPES[dtype]) if name == "vae" else DTYPES[dtype]
                   for name in params}
        params = {name: jax.tree.map(lambda x, d=targets[name]: np.asarray(x).astype(d), tree)
                  for name, tree in params.items()}
    with atomic_folder(out, force=force) as tmp:
        _write_configs(pipe, tmp)
        _write_json(tmp / MARKER, {
            "format": "sdjax", "version": FORMAT_VERSION,
            "projections": {n: e.module.with_projection for n, e in pipe.text_encoders.items()},
            "force_zeros_for_empty_prompt": pipe.force_zeros_for_empty_prompt,
            "requires_aesthetics_score": pipe.requires_aesthetics_score,
            **(metadata or {}),
        })
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", jax.tree.map(np.asarray, params))
        checkpointer.wait_until_finished()
    return Path(out)


def load_checkpoint(folder: str | Path, *, dtype: Any = jnp.float32) -> Pipeline:
    import orbax.checkpoint as ocp

    from sdjax.tokenizer import load_tokenizer

    folder = Path(folder).absolute()
    meta = read_json(folder / MARKER)
    if meta.get("format") != "sdjax" or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{folder}: not an sdjax checkpoint of version {FORMAT_VERSION} ({MARKER}: {meta})")
    names = ["unet", "vae"] + [n for n in TEXT_ENCODERS if n in meta["projections"]]
    configs = {name: read_json(folder / name / "config.json") for name in names}
    params = ocp.StandardCheckpointer().restore(folder / "params")
    from sdjax.models.vae import VAEConfig

    vae_dtype = vae_param_dtype(VAEConfig.from_dict(configs["vae"]), dtype)
    params = {name: jax.tree.map(lambda x, d=(vae_dtype if name == "vae" else dtype): host_array(x, d), tree)
              for name, tree in params.items()}
    tokenizers = {name: load_tokenizer(folder / TOKENIZER_FOR[name],
                                       convention="clip") for name in meta["projections"]}
    return assemble(configs=configs, params=params, scheduler_config=read_json(folder / "scheduler" /
                    "scheduler_config.json"), tokenizers=tokenizers, projections=meta["projections"], dtype=dtype,
                    force_zeros_for_empty_prompt=meta["force_zeros_for_empty_prompt"],
                    requires_aesthetics_score=meta["requires_aesthetics_score"], source=str(folder))


# Modules that PyTorch stores as 1x1 convolutions and sdjax runs as Dense layers (matmuls over channels).
_POINTWISE_CONVS = frozenset({"conv_shortcut", "quant_conv", "post_quant_conv"})


def torch_state_dict(params: Any, *, conv_projections: bool = False) -> dict[str, np.ndarray]:
    """A UNet's, VAE's or text encoder's params as a diffusers/transformers state dict (PyTorch names and
    layouts). Dense kernels that diffusers stores as 1x1 convolutions get their 4-D shape back;
    ``conv_projections``: a UNet without ``use_linear_projection`` (its proj_in/proj_out are convs too)."""
    pointwise = _POINTWISE_CONVS | ({"proj_in", "proj_out"} if conv_projections else set())
    shapes = {path_to_torch_key(path): (value.shape[1], value.shape[0], 1, 1)
              for path, value in flatten(params).items()
              if path[-1] == "kernel" and np.ndim(value) == 2 and len(path) > 1 and path[-2] in pointwise}
    state = from_flax_params(params, torch_shapes=shapes)
    # safetensors' numpy writer has no bfloat16: such params are written as float32.
    return {k: np.ascontiguousarray(np.asarray(v, np.float32) if v.dtype == jnp.bfloat16 else v)
            for k, v in state.items()}


def export_diffusers(pipe: Pipeline, out: str | Path, *, force: bool = False) -> Path:
    """Write ``pipe`` as a diffusers-format folder (safetensors), readable by diffusers' from_pretrained."""
    from safetensors.numpy import save_file

    with atomic_folder(out, force=force) as tmp:
        _write_configs(pipe, tmp)
        index: dict[str, Any] = {"_class_name": "StableDiffusionXLPipeline" if pipe.is_sdxl
                                 else "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                                 "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        if pipe.is_sdxl:
            index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
            if pipe.requires_aesthetics_score:
                index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True)
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        for name in ("unet", "vae", *pipe.text_encoders):
            conv_projections = name == "unet" and not pipe.unet.config.use_linear_projection
            state = torch_state_dict(pipe.params[name], conv_projections=conv_projections)
            if name in pipe.text_encoders:
                arch = "CLIPTextModelWithProjection" if pipe.text_encoders[name].module.with_projection \
                    else "CLIPTextModel"
                index[name] = ["transformers", arch]
                index[TOKENIZER_FOR[name]] = ["transformers", "CLIPTokenizer"]
                file = tmp / name / "model.safetensors"
            else:
                file = tmp / name / "diffusion_pytorch_model.safetensors"
            save_file(state, str(file), metadata={"format": "pt"})
        for missing in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if pipe.is_sdxl:
                index.setdefault(missing, [None, None])
        _write_json(tmp / "model_index.json", index)
    return Path(out)
