"""IP-Adapter for the generation core: loading the usual files (``ip-adapter_sd15.safetensors`` / ``.bin``,
``ip-adapter-plus_sd15``, SDXL ones) and an image-encoder folder, the UNet params with the decoupled
cross-attention weights added, and the image embeddings / tokens as diffusers computes them.

Per generation (not per step: nothing here depends on the latents or the timestep) the core does::

    cond, uncond = encode_image(adapter, ip_adapter_image)            # host + jit; diffusers' encode_image
    embeds = concat([uncond, cond]) under CFG, repeated per image      # (B, images, ...) per adapter
    tokens = [ip_adapter_tokens(a, e) for a, e in zip(adapters, embeds)]
    unet_params = with_ip_adapters(unet_params, adapters)              # once, when the adapter is loaded

and per UNet evaluation passes ``ip_adapter_tokens=tokens, ip_adapter_scales=scales`` (traced) to the UNet.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from sdjax.models.config import read_json
from sdjax.models.ip_adapter import (
    ImageProjection,
    ImageProjectionConfig,
    IPAdapterPlusImageProjection,
    PlusProjectionConfig,
)
from sdjax.models.unet import UNetConfig

Params = dict[str, Any]
ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageEncoder:
    """A CLIP vision tower with its params and the transformers image processor that feeds it."""

    module: CLIPVisionModelWithProjection
    params: Params
    config: CLIPVisionConfig
    processor: Any  # transformers.CLIPImageProcessor


@dataclasses.dataclass(frozen=True, eq=False)
class IPAdapter:
    """One loaded IP-Adapter: its image projection, the per-cross-attention ``to_k_ip``/``to_v_ip`` kernels
    (keyed by the UNet's attn2 param path), and its image encoder (None when loaded without one)."""

    projection: ImageProjection | IPAdapterPlusImageProjection
    projection_params: Params
    attention: dict[tuple[str, ...], dict[str, jax.Array]]
    image_encoder: ImageEncoder | None
    scale: float = 1.0

    @property
    def plus(self) -> bool:
        """Plus adapters read the encoder's penultimate hidden states instead of its image embedding."""
        return isinstance(self.projection, IPAdapterPlusImageProjection)

    @property
    def num_tokens(self) -> int:
        c = self.projection.config
        return c.num_tokens if isinstance(c, ImageProjectionConfig) else c.num_queries


def cross_attention_paths(unet_config: UNetConfig) -> list[tuple[str, ...]]:
    """The UNet's cross-attention (attn2) module paths in diffusers' ``attn_processors`` order: down blocks, up
    blocks, then the mid block (the order IP-Adapter files number them in, 1, 3, 5, ...)."""
    from sdjax.convert.unet import unet_param_shapes
    from sdjax.convert.weights import flatten

    paths = {p[: p.index("attn2") + 1] for p in flatten(unet_param_shapes(unet_config)) if "attn2" in p}
    rank = {"down": 0, "up": 1, "mid": 2}

    def key(path: tuple[str, ...]) -> tuple[Any, ...]:
        return (rank[path[0].split("_")[0]],) + tuple(int(n) for n in re.findall(r"\d+", "/".join(path)))
    return sorted(paths, key=key)


def read_ip_adapter_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(image_proj, ip_adapter)`` state dicts of an IP-Adapter file: safetensors with ``image_proj.*`` /
    ``ip_adapter.*`` keys, or the original ``.bin`` (a pickled ``{"image_proj": ..., "ip_adapter": ...}``, read
    with the weights-only loader)."""
    from sdjax.convert.safe_load import (
        CheckpointError,
        _tensors_to_numpy,
        is_torch_pickle,
        load_pickle,
        read_state_dict,
    )

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such IP-Adapter file")
    if is_torch_pickle(path):
        raw = load_pickle(path)
        if not (isinstance(raw, Mapping) and "image_proj" in raw and "ip_adapter" in raw):
            raise CheckpointError(f"{path}: not an IP-Adapter file (needs 'image_proj' and 'ip_adapter' entries)")
        return _tensors_to_numpy(raw["image_proj"], path), _tensors_to_numpy(raw["ip_adapter"], path)
    state = read_state_dict(path)
    proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    attn = {k.removeprefix("ip_adapter."): v for k, v in state.items() if k.startswith("ip_adapter.")}
    if not proj or not attn:
        raise CheckpointError(f"{path}: not an IP-Adapter file (no image_proj.* / ip_adapter.* keys)")
    return proj, attn


def load_ip_adapter(path: str | os.PathLike, unet_config: UNetConfig, *,
                    image_encoder: str | os.PathLike | ImageEncoder | None = None, scale: float = 1.0,
                    dtype: Any = jnp.float32) -> IPAdapter:
    """Load an IP-Adapter file for a UNet of ``unet_config``; ``image_encoder``: a transformers
    CLIPVisionModelWithProjection folder (h94's ``models/image_encoder``), an already loaded one, or None."""
    from sdjax.convert.safe_load import CheckpointError

    proj_state, attn_state = read_ip_adapter_file(path)
    projection, proj_params = _convert_projection(proj_state, dtype)
    paths = cross_attention_paths(unet_config)
    ids = sorted({int(k.split(".")[0]) for k in attn_state})
    if ids != [2 * i + 1 for i in range(len(paths))]:
        raise CheckpointError(f"{path}: IP-Adapter has {len(ids)} cross-attention entries; this UNet has "
                              f"{len(paths)} (is it for another model family?)")
    attention = {}
    for i, p in enumerate(paths):
        entry = {}
        for name in ("to_k_ip", "to_v_ip"):
            weight = attn_state.get(f"{2 * i + 1}.{name}.weight")
            if weight is None:
                raise CheckpointError(f"{path}: ip_adapter.{2 * i + 1}.{name}.weight is missing")
            entry[name] = jnp.asarray(np.asarray(weight).T, dtype)
        attention[p] = entry
    encoder = image_encoder if isinstance(image_encoder, ImageEncoder) or image_encoder is None else \
        load_image_encoder(image_encoder, dtype=dtype)
    return IPAdapter(projection, proj_params, attention, encoder, scale)


def _convert_projection(state: Mapping[str, np.ndarray], dtype: Any) -> tuple[Any, Params]:
    from sdjax.convert.safe_load import CheckpointError
    from sdjax.convert.weights import to_flax_params

    if "proj.weight" in state:
        cross = int(state["norm.weight"].shape[0])
        width, features = int(state["proj.weight"].shape[1]), int(state["proj.weight"].shape[0])
        cfg = ImageProjectionConfig(width, cross, features // cross)
        module: Any = ImageProjection(cfg, dtype=dtype)
        renamed = {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v for k, v in state.items()}
        example = jnp.zeros((1, cfg.image_embed_dim))
    elif "latents" in state:
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        cfg = PlusProjectionConfig(
            embed_dims=int(state["proj_in.weight"].shape[1]), output_dims=int(state["proj_out.weight"].shape[0]),
            hidden_dims=int(state["latents"].shape[2]), heads=int(state["layers.0.0.to_q.weight"].shape[0]) // 64,
            num_queries=int(state["latents"].shape[1]), depth=depth)
        module = IPAdapterPlusImageProjection(cfg, dtype=dtype)
        renamed = _rename_resampler(state)
        example = jnp.zeros((1, 2, cfg.embed_dims))
    else:
        raise CheckpointError("unsupported IP-Adapter image projection (sdjax reads IP-Adapter and IP-Adapter "
                              f"Plus; keys: {sorted(state)[:6]})")
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), example))["params"]
    params = to_flax_params(renamed, shapes, dtype=dtype, what="IP-Adapter image projection")
    return module, jax.tree.map(jnp.asarray, params)


def _rename_resampler(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original Resampler's keys -> diffusers' IPAdapterPlusImageProjection keys (``to_kv`` split)."""
    inner = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_out": "attn.to_out.0",
             "1.0": "ff.0", "1.1": "ff.1.net.0.proj", "1.3": "ff.1.net.2"}
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(\d\.\w+|\d\.\d)\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        layer, module, leaf = match.groups()
        if module == "0.to_kv":
            k, v = np.split(np.asarray(value), 2, axis=0)
            out[f"layers.{layer}.attn.to_k.{leaf}"], out[f"layers.{layer}.attn.to_v.{leaf}"] = k, v
        else:
            out[f"layers.{layer}.{inner.get(module, module)}.{leaf}"] = value
    return out


def with_ip_adapters(unet_params: Params, adapters: Sequence[IPAdapter]) -> Params:
    """The UNet params with adapter ``j``'s ``to_k_ip_j``/``to_v_ip_j`` kernels in every cross-attention (a new
    tree; the UNet then needs ``ip_adapter_tokens`` with one entry per adapter, in this order)."""
    def copy(tree: Any) -> Any:
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

    out = copy(unet_params)
    for j, adapter in enumerate(adapters):
        for path, entry in adapter.attention.items():
            node = out
            for name in path:
                if name not in node:
                    raise ValueError(f"IP-Adapter {j} does not fit this UNet: no {'/'.join(path)}")
                node = node[name]
            for name, kernel in entry.items():
                node[f"{name}_{j}"] = {"kernel": kernel}
    return out


def load_image_encoder(folder: str | os.PathLike, *, dtype: Any = jnp.float32) -> ImageEncoder:
    """A transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors / pytorch_model.bin)."""
    from transformers import CLIPImageProcessor

    from sdjax.convert.clip_vision import convert_clip_vision
    from sdjax.convert.safe_load import CheckpointError, read_state_dict

    folder = Path(folder)
    weights = next((folder / f for f in ENCODER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no {' or '.join(ENCODER_WEIGHTS)} in this image-encoder folder")
    cfg = CLIPVisionConfig.from_dict(read_json(folder / "config.json"))
    params = jax.tree.map(jnp.asarray, convert_clip_vision(read_state_dict(weights), cfg, dtype=dtype))
    # diffusers' load_ip_adapter builds this processor when the pipeline has no feature_extractor.
    processor = CLIPImageProcessor(size=cfg.image_size, crop_size=cfg.image_size)
    return ImageEncoder(CLIPVisionModelWithProjection(cfg, dtype=dtype), params, cfg, processor)


def encode_image(adapter: IPAdapter, image: Any, num_images_per_prompt: int = 1) -> tuple[jax.Array, jax.Array]:
    """diffusers' ``encode_image``: ``(cond, uncond)``. Plain adapters: the image embedding and zeros; Plus: the
    penultimate hidden states of the image and of an all-zero pixel input. ``image``: what CLIPImageProcessor
    takes (PIL image(s), arrays)."""
    encoder = adapter.image_encoder
    if encoder is None:
        raise ValueError("this IP-Adapter was loaded without an image encoder: pass image_encoder= or embeddings")
    pixels = np.asarray(encoder.processor(image, return_tensors="np")["pixel_values"], np.float32)
    pixels = jnp.asarray(pixels.transpose(0, 2, 3, 1))

    def run(p: Params, x: jax.Array) -> jax.Array:
        out = encoder.module.apply({"params": p}, x)
        return out.hidden_states[-2] if adapter.plus else out.image_embeds

    cond = jax.jit(run)(encoder.params, pixels)
    uncond = jax.jit(run)(encoder.params, jnp.zeros_like(pixels)) if adapter.plus else jnp.zeros_like(cond)
    return (jnp.repeat(cond, num_images_per_prompt, axis=0), jnp.repeat(uncond, num_images_per_prompt, axis=0))


def ip_adapter_tokens(adapter: IPAdapter, embeds: jax.Array) -> jax.Array:
    """diffusers' MultiIPAdapterImageProjection for one adapter: (B, images, ...) embeds -> (B, images, T, C)
    tokens ((B, ...) without the images axis is taken as one image each). Traceable."""
    if embeds.ndim == (2 if not adapter.plus else 3):
        embeds = embeds[:, None]
    batch, images = embeds.shape[:2]
    tokens = adapter.projection.apply({"params": adapter.projection_params},
                                      embeds.reshape((batch * images,) + embeds.shape[2:]))
    return tokens.reshape((batch, images) + tokens.shape[1:])
