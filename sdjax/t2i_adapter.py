"""T2I-Adapter for the generation core: loading (diffusers folders or files), the residuals as diffusers' adapter
pipelines compute them, and the adapter image preparation.

Unlike ControlNet, the adapter does not see the latents or the timestep: its features are computed once per
generation (``t2i_adapter_residuals``), repeated like the latents (``num_images_per_prompt``, then doubled for
classifier-free guidance, unconditional half first, the same features) and passed to every UNet evaluation as
``down_intrablock_additional_residuals``. The SDXL adapter pipeline uses them only while
``i < int(num_steps * adapter_conditioning_factor)`` (:func:`adapter_keep`); the SD one always.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax.models.config import read_json
from sdjax.models.t2i_adapter import T2IAdapter, T2IAdapterConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclasses.dataclass(frozen=True, eq=False)
class T2IAdapterModel:
    """A loaded T2I-Adapter: the Flax module, its params and config."""

    module: T2IAdapter
    params: dict[str, Any]
    config: T2IAdapterConfig

    def __call__(self, image: jax.Array) -> list[jax.Array]:
        return self.module.apply({"params": self.params}, image)


@functools.cache
def t2i_adapter_param_shapes(config: T2IAdapterConfig) -> dict[str, Any]:
    size = config.downscale_factor * 2 ** len(config.channels)
    x = jnp.zeros((1, size, size, config.in_channels))
    return jax.eval_shape(lambda: T2IAdapter(config).init(jax.random.key(0), x))["params"]


def load_t2i_adapter(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                     config: str | os.PathLike | Mapping[str, Any] | None = None) -> T2IAdapterModel:
    """A diffusers T2IAdapter folder (config.json + weights) or weights file (config.json beside it or
    ``config=``)."""
    from sdjax.convert.safe_load import CheckpointError, read_state_dict
    from sdjax.convert.weights import to_flax_params

    path = Path(path)
    if path.is_dir():
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_FILES)} in this T2I-Adapter folder")
        config_source = path / "config.json"
    else:
        weights, config_source = path, path.parent / "config.json"
    if isinstance(config, Mapping):
        raw = dict(config)
    else:
        source = Path(config) if config is not None else config_source
        raw = read_json(source / "config.json" if source.is_dir() else source)
    cfg = T2IAdapterConfig.from_dict(raw)
    params = to_flax_params(read_state_dict(weights), t2i_adapter_param_shapes(cfg), dtype=dtype,
                            what="T2I-Adapter")
    return T2IAdapterModel(T2IAdapter(cfg, dtype=dtype), jax.tree.map(jnp.asarray, params), cfg)


def t2i_adapter_residuals(adapters: Sequence[T2IAdapterModel], images: Sequence[jax.Array],
                          scales: jax.Array | Sequence[float]) -> tuple[jax.Array, ...]:
    """The features the UNet adds: one adapter's times its ``adapter_conditioning_scale``, or diffusers'
    MultiAdapter weighted sum (each adapter its own image and weight). Traceable."""
    if not adapters or len(images) != len(adapters):
        raise ValueError(f"{len(adapters)} T2I-Adapters need as many images; got {len(images)}")
    scales = jnp.asarray(scales, jnp.float32).reshape(-1)
    if scales.shape != (len(adapters),):
        raise ValueError(f"{len(adapters)} T2I-Adapters need {len(adapters)} scales; got shape {scales.shape}")
    total: list[jax.Array] | None = None
    for k, (adapter, image) in enumerate(zip(adapters, images, strict=True)):
        features = [f * scales[k].astype(f.dtype) for f in adapter(image)]
        if total is None:
            total = features
        else:
            if len(features) != len(total):
                raise ValueError("T2I-Adapters with different numbers of features cannot be combined")
            total = [a + b for a, b in zip(total, features, strict=True)]
    return tuple(total)


def adapter_keep(num_steps: int, adapter_conditioning_factor: float = 1.0) -> np.ndarray:
    """(num_steps,) float32 0/1: the SDXL adapter pipeline's ``i < int(num_steps * factor)``."""
    if not 0.0 <= adapter_conditioning_factor <= 1.0:
        raise ValueError(f"adapter_conditioning_factor must be in [0, 1]; got {adapter_conditioning_factor}")
    return (np.arange(num_steps) < int(num_steps * adapter_conditioning_factor)).astype(np.float32)


def prepare_adapter_image(image: Any, height: int, width: int) -> np.ndarray:
    """diffusers' ``_preprocess_adapter_image``: PIL images Lanczos-resized to (width, height), kept in their own
    mode (an "L" sketch gives one channel), /255 -> (B, H, W, C) float32; arrays in [0, 1] are taken as they are
    ((H, W, C) or (B, H, W, C), at the generation size, as diffusers takes tensors)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, list) and image and isinstance(image[0], Image.Image):
        arrays = [np.asarray(im.resize((width, height), resample=Image.LANCZOS)) for im in image]
        arrays = [a[None, ..., None] if a.ndim == 2 else a[None] for a in arrays]
        return np.concatenate(arrays, axis=0).astype(np.float32) / 255.0
    batch = np.asarray(image, np.float32)
    batch = batch[None] if batch.ndim == 3 else batch
    if batch.ndim != 4 or batch.shape[1:3] != (height, width):
        raise ValueError(f"adapter image arrays must be (B, {height}, {width}, C); got shape {batch.shape}")
    return batch
