"""ControlNet for the generation core: loading, the per-step residuals of one or several ControlNets (diffusers'
MultiControlNet), control-image preparation, and the start/end schedule (diffusers' ``controlnet_keep``).

Per UNet evaluation the core does, with ``i`` diffusers' loop counter (:func:`diffusers_evaluation`: the
evaluation's index among those of the steps actually run; the step index for first-order samplers)::

    scales_i = scales * keep[i]                       # keep as controlnet_keep() (traced in the core)
    down, mid = controlnet_residuals(nets, x_in, t, context, images, scales_i, added_cond=..., guess_mode=...)
    eps = unet.apply(..., down_block_additional_residuals=down, mid_block_additional_residual=mid)

``x_in`` is the UNet's (scaled) 4-channel latent input: for inpainting UNets, before the mask and masked-image
latents are concatenated (as diffusers' ControlNet inpaint pipeline does).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax.models.controlnet import ControlNetConfig, ControlNetModel

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class ControlNet:
    """A loaded ControlNet: the Flax module, its params (a pytree) and config."""

    module: ControlNetModel
    params: Params
    config: ControlNetConfig

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: jax.Array | float = 1.0, *, guess_mode: bool = False,
                 **added_cond: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        return self.module.apply({"params": self.params}, sample, timesteps, encoder_hidden_states, controlnet_cond,
                                 conditioning_scale, guess_mode=guess_mode, **added_cond)


def load_controlnet(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                    config: str | os.PathLike | Mapping[str, Any] | None = None) -> ControlNet:
    """Load a ControlNet: a diffusers folder, a diffusers-layout ``.safetensors``/``.bin`` (with ``config.json``
    beside it or ``config=``), or an A1111/lllyasviel control file (``control_*.pth``/``.safetensors``; SD 1.5,
    SD 2.1 and SDXL configs are recognised from its shapes, ``config=`` overrides).

    ``dtype``: params and compute dtype.
    """
    from sdjax.convert.controlnet import convert_controlnet, read_controlnet

    state, raw = read_controlnet(Path(path), config)
    cfg = ControlNetConfig.from_dict(raw)
    params = convert_controlnet(state, cfg, dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    return ControlNet(ControlNetModel(cfg, dtype=dtype), params, cfg)


def effective_guess_mode(nets: Sequence[ControlNet], guess_mode: bool) -> bool:
    """diffusers' pipelines switch guess mode on when the (first) ControlNet pools globally
    (``global_pool_conditions``, e.g. shuffle)."""
    return guess_mode or bool(nets and nets[0].config.global_pool_conditions)


def controlnet_residuals(
    nets: Sequence[ControlNet],
    x_in: jax.Array,
    t: jax.Array | float,
    context: jax.Array,
    control_images: Sequence[jax.Array],
    scales: jax.Array | Sequence[float],
    *,
    added_cond: Mapping[str, jax.Array] | None = None,
    guess_mode: bool = False,
    params: Sequence[Params] | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The summed ``(down_block_residuals, mid_residual)`` of several ControlNets, as diffusers'
    MultiControlNetModel: each net gets the same latents, timestep, context and guess mode, its own image and
    scale (``scales`` (n,), traced; already multiplied by the step's keep value). Traceable.

    ``params`` (optional) replaces each net's params, for passing them into jit as arguments rather than
    closing over them. ``added_cond``: SDXL's ``text_embeds`` and ``time_ids``.
    """
    if not nets:
        raise ValueError("controlnet_residuals needs at least one ControlNet")
    if len(control_images) != len(nets):
        raise ValueError(f"{len(nets)} ControlNets need {len(nets)} control images; got {len(control_images)}")
    scales = jnp.asarray(scales, jnp.float32).reshape(-1)
    if scales.shape != (len(nets),):
        raise ValueError(f"{len(nets)} ControlNets need {len(nets)} scales; got shape {scales.shape}")
    params = [n.params for n in nets] if params is None else list(params)
    down: list[jax.Array] | None = None
    mid = None
    for k, (net, p, image) in enumerate(zip(nets, params, control_images, strict=True)):
        d, m = net.module.apply({"params": p}, x_in, t, context, image, scales[k], guess_mode=guess_mode,
                                **(added_cond or {}))
        if down is None:
            down, mid = list(d), m
        else:
            if len(d) != len(down):
                raise ValueError("ControlNets of different depths cannot be combined")
            down = [a + b for a, b in zip(down, d, strict=True)]
            mid = mid + m
    return tuple(down), mid


def guess_mode_cfg_residuals(down: Sequence[jax.Array], mid: jax.Array, n_uncond: int
                             ) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Guess mode with classifier-free guidance: diffusers runs the ControlNets on the conditional half only and
    gives the unconditional half (first in the batch) zero residuals."""
    def pad(r: jax.Array) -> jax.Array:
        return jnp.concatenate([jnp.zeros((n_uncond,) + r.shape[1:], r.dtype), r], axis=0)
    return tuple(pad(r) for r in down), pad(mid)


# --- start / end ---------------------------------------------------------------------------------------------


def guidance_ranges(n_nets: int, start: float | Sequence[float] = 0.0, end: float | Sequence[float] = 1.0
                    ) -> tuple[list[float], list[float]]:
    """``control_guidance_start``/``_end`` broadcast to one value per ControlNet and checked, as diffusers does."""
    starts = list(start) if isinstance(start, Sequence) else None
    ends = list(end) if isinstance(end, Sequence) else None
    if starts is None and ends is None:
        starts, ends = [float(start)] * n_nets, [float(end)] * n_nets
    elif starts is None:
        starts = [float(start)] * len(ends)
    elif ends is None:
        ends = [float(end)] * len(starts)
    if len(starts) != len(ends):
        raise ValueError(f"control_guidance_start has {len(starts)} values but control_guidance_end has {len(ends)}")
    if len(starts) != n_nets:
        raise ValueError(f"control_guidance_start/end have {len(starts)} values for {n_nets} ControlNets")
    for s, e in zip(starts, ends, strict=True):
        if s >= e:
            raise ValueError(f"control_guidance_start {s} must be smaller than control_guidance_end {e}")
        if s < 0.0:
            raise ValueError(f"control_guidance_start {s} can't be smaller than 0")
        if e > 1.0:
            raise ValueError(f"control_guidance_end {e} can't be larger than 1.0")
    return starts, ends


def controlnet_keep(num_steps: int, starts: Sequence[float], ends: Sequence[float]) -> np.ndarray:
    """(num_steps, n) float32 of 0/1: diffusers' ``controlnet_keep``. Entry ``i`` of ``num_steps`` (diffusers'
    ``len(timesteps)`` after img2img's strength cut: the steps run for first-order samplers, their model
    evaluations otherwise, see :func:`diffusers_evaluation`) uses ControlNet k unless ``i / num_steps < start_k``
    or ``(i + 1) / num_steps > end_k`` (computed in float64 as Python does)."""
    keep = [[1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends, strict=True)]
            for i in range(num_steps)]
    return np.asarray(keep, np.float32).reshape(num_steps, len(starts))


# diffusers' pipelines count model evaluations, not steps: ``for i, t in enumerate(scheduler.timesteps)`` and
# ``controlnet_keep`` over ``len(timesteps)``. Second-order schedulers list a step's two timesteps (2N - 1 in
# all: the last step has one evaluation); PNDM (skip_prk_steps) lists the first one twice (N + 1).
SECOND_ORDER = frozenset({"heun", "dpm2", "dpmpp_sde"})


def diffusers_evaluation(sampler: str, step: Any, k: int, n_run: Any) -> tuple[jax.Array, jax.Array]:
    """``(i, len(timesteps))`` of diffusers' denoising loop for evaluation ``k`` (0 or 1) of the run's step
    ``step`` (0-based from the first step run; traced) of ``n_run`` steps run (traced) with ``sampler``."""
    j, n, k = jnp.asarray(step, jnp.int32), jnp.asarray(n_run, jnp.int32), min(int(k), 1)
    if sampler in SECOND_ORDER:
        return 2 * j + k, 2 * n - 1
    if sampler == "pndm":  # the warm-up's second evaluation is the timesteps' repeated entry
        return j + jnp.where(j > 0, 1, k), n + (n > 1).astype(jnp.int32)
    return j, n


# --- control images --------------------------------------------------------------------------------------------


def prepare_control_image(image: Any, height: int, width: int, batch_size: int = 1,
                          num_images_per_prompt: int = 1) -> np.ndarray:
    """A control image as diffusers' ControlNet pipelines prepare it (``VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False)``, then ``prepare_image``): (B, height, width, 3) float32 in [0, 1], NHWC.

    ``image``: a PIL image or a list of them (RGB-converted, Lanczos-resized to (width, height) as diffusers),
    or an array in [0, 1]: (H, W, 3), (B, H, W, 3) or a list of (H, W, 3) arrays (nearest-neighbour resized, as
    diffusers' torch interpolate). One image is repeated for the ``batch_size`` prompts' images, a batch of them
    ``num_images_per_prompt`` times each. Classifier-free guidance doubles it (outside guess mode): the core's job.
    """
    if isinstance(image, Image.Image) or (isinstance(image, list) and image and isinstance(image[0], Image.Image)):
        images = [image] if isinstance(image, Image.Image) else image
        arrays = [np.asarray(im.convert("RGB").resize((width, height), resample=Image.LANCZOS), np.float32) / 255.0
                  for im in images]
        batch = np.stack(arrays)
    else:
        if isinstance(image, list):
            image = np.stack([np.asarray(a) for a in image])
        batch = np.asarray(image, np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise ValueError(f"control_image arrays must be (H, W, 3) or (B, H, W, 3) in [0, 1]; got shape "
                             f"{batch.shape}")
        if batch.min() < 0 or batch.max() > 1:
            raise ValueError(f"control_image arrays must hold values in [0, 1]; got [{batch.min():.3g}, "
                             f"{batch.max():.3g}]")
        if batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)
        batch = _resize_nearest(batch, height, width)
    repeat = batch_size if batch.shape[0] == 1 else num_images_per_prompt
    return np.repeat(batch, repeat, axis=0)


def _resize_nearest(batch: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's ``F.interpolate(mode="nearest")``: source index floor(dst * (in / out)) in float32."""
    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    return batch[:, index(batch.shape[1], height)][:, :, index(batch.shape[2], width)]
