"""One generation core for text-to-image, image-to-image and inpainting.

The three tasks differ only in their initial state and per-step masking:

- text-to-image: pure noise, all steps;
- image-to-image: the VAE-encoded image noised to the step that ``strength`` picks (SDXL's refiner:
  the base's latents as they are, from ``denoising_start``);
- inpainting: as image-to-image, plus either the mask and masked image as extra UNet channels (9-channel
  inpainting UNets) or, for ordinary UNets, re-imposing the noised original outside the mask after each step.

Everything after tokenization (text encoding, VAE encoding, the whole sampler loop) is one jitted function;
its static arguments are the model, the sampler, the step count and the shapes. Guidance scale, guidance
rescale, eta, strength and the per-image keys are traced, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import guidance, images, parallel, text
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL, sample_latent, scale_latents, unscale_latents
from sdjax.samplers import (
    add_noise,
    denoising_end_step,
    denoising_start_step,
    get_sampler,
    img2img_start_step,
    inpaint_post_step,
    make_schedule,
    sample,
)
from sdjax.samplers.schedules import SchedulerConfig

OUTPUTS = ("np", "pil", "latent")
# Inputs that are one value for the whole batch (replicated); every other input has the batch first.
SHARED_INPUTS = ("guidance_scale", "guidance_rescale", "eta", "strength")


@dataclasses.dataclass(frozen=True)
class Model:
    """The hashable, static half of a Pipeline (modules and configs, no params): a jit static argument."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[tuple[str, CLIPTextModel], ...]
    scheduler: SchedulerConfig
    is_sdxl: bool

    @classmethod
    def of(cls, pipe: Any) -> Model:
        encoders = tuple((name, enc.module) for name, enc in pipe.text_encoders.items())
        return cls(pipe.unet, pipe.vae, encoders, pipe.scheduler, pipe.is_sdxl)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that fixes shapes or code paths for one compile."""

    sampler: str
    sigma_schedule: str | None
    num_steps: int
    latent_size: tuple[int, int]
    clip_skip: int | None
    cfg: bool
    zero_uncond: bool
    task: str  # "text", "image", "latent_image" (SDXL refiner hand-off), "inpaint"
    start_from_noise: bool = False  # inpainting at strength 1 starts from pure noise, as diffusers does
    denoising_start: float | None = None
    denoising_end: float | None = None


# --- the jitted core --------------------------------------------------------------------------------------


def _encode_prompts(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Mapping[str, Any]):
    ctx, pooled = text.encode_modules(model.is_sdxl, model.text_encoders, params, inputs["ids"], plan.clip_skip)
    if not plan.cfg:
        return ctx, pooled, None, None
    if plan.zero_uncond:
        return ctx, pooled, jnp.zeros_like(ctx), None if pooled is None else jnp.zeros_like(pooled)
    uctx, upooled = text.encode_modules(model.is_sdxl, model.text_encoders, params, inputs["uncond_ids"],
                                        plan.clip_skip)
    return ctx, pooled, uctx, upooled


def _encode_image(model: Model, params: Mapping[str, Any], image: jax.Array, keys: jax.Array) -> jax.Array:
    """Pixels in [0, 1] (B, H, W, 3) -> scaled latents, sampled from the VAE posterior with each image's key."""
    mean, logvar = model.vae.apply({"params": params["vae"]}, image * 2.0 - 1.0, method=AutoencoderKL.encode)
    z = jax.vmap(lambda m, lv, k: sample_latent(m[None], lv[None], k)[0])(mean, logvar, keys)
    return scale_latents(z, model.vae.config)


def _image_keys(keys: jax.Array, stream: int) -> jax.Array:
    # Separate streams per image: 0 initial noise, 1 sampler noise, 2 and 3 VAE posterior samples.
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def _start_and_end(plan: Plan, schedule: Any, inputs: Mapping[str, Any]) -> tuple[Any, Any]:
    """The loop's first and last steps: img2img strength or SDXL's denoising_start / denoising_end."""
    if plan.denoising_start is not None:
        start = denoising_start_step(schedule, plan.denoising_start)
    elif "strength" in inputs:
        start = img2img_start_step(plan.num_steps, inputs["strength"])
    else:
        start = 0
    end = None if plan.denoising_end is None else denoising_end_step(schedule, plan.denoising_end)
    return start, end


def _image_conditioning(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Mapping[str, Any],
                        schedule: Any, noise: jax.Array) -> tuple[Any, Any, Any]:
    """(clean initial latents, extra UNet input channels, per-step blend) for the image tasks."""
    keys = inputs["keys"]
    init_latents = extra_channels = blend_step = None
    if plan.task == "latent_image":
        init_latents = inputs["image"]
    elif plan.task in ("image", "inpaint"):
        init_latents = _encode_image(model, params, inputs["image"], _image_keys(keys, 2))
    if plan.task == "inpaint":
        f = model.vae.config.downsample_factor
        h, w = plan.latent_size
        mask = inputs["mask"]  # (B, H, W, 1), 1 = repaint
        latent_mask = mask[:, ::f, ::f][:, :h, :w]  # torch's nearest-neighbour downsizing
        if model.unet.config.in_channels == 2 * model.vae.config.latent_channels + 1:
            # The masked image has the repainted pixels at 0 in [-1, 1] (mid-grey), as diffusers' and as the
            # inpainting UNets were trained.
            masked_pixels = jnp.where(mask < 0.5, inputs["image"], 0.5)
            masked = _encode_image(model, params, masked_pixels, _image_keys(keys, 3))
            extra_channels = jnp.concatenate([latent_mask, masked], axis=-1)
        else:
            blend_step = inpaint_post_step(schedule, init_latents, noise, latent_mask)
    return init_latents, extra_channels, blend_step


def _guided_model(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Mapping[str, Any],
                  extra_channels: jax.Array | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x_in, t)`` for the sampler: the UNet with classifier-free guidance (one call on interleaved
    [uncond, cond] pairs), guidance rescale, and SDXL's / LCM's extra conditioning."""
    unet_config = model.unet.config
    ctx, pooled, uctx, upooled = _encode_prompts(model, plan, params, inputs)
    added = {}
    if model.is_sdxl:
        added = {"text_embeds": pooled, "time_ids": inputs["time_ids"]}
        if plan.cfg:
            added = {"text_embeds": guidance.interleave(upooled, pooled),
                     "time_ids": guidance.interleave(inputs["uncond_time_ids"], inputs["time_ids"])}
    timestep_cond = None
    if unet_config.time_cond_proj_dim is not None:
        emb = guidance.guidance_scale_embedding(inputs["guidance_scale"] - 1.0, unet_config.time_cond_proj_dim)
        timestep_cond = jnp.broadcast_to(emb, (ctx.shape[0], emb.shape[-1]))
    context = guidance.interleave(uctx, ctx) if plan.cfg else ctx

    def model_fn(x_in: jax.Array, t: jax.Array) -> jax.Array:
        if extra_channels is not None:
            x_in = jnp.concatenate([x_in, extra_channels.astype(x_in.dtype)], axis=-1)
        if plan.cfg:
            x_in = guidance.interleave(x_in, x_in)
        ts = jnp.broadcast_to(t, (x_in.shape[0],))
        out = model.unet.apply({"params": params["unet"]}, x_in.astype(model.unet.dtype), ts, context,
                               timestep_cond=timestep_cond, **added).astype(jnp.float32)
        if not plan.cfg:
            return out
        uncond_out, cond_out = guidance.split_pairs(out)
        guided = guidance.classifier_free(uncond_out, cond_out, inputs["guidance_scale"])
        amount = inputs["guidance_rescale"]
        return jnp.where(amount > 0, guidance.rescale(guided, cond_out, amount), guided)

    return model_fn


def denoise(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> jax.Array:
    """Latents (B, h, w, C) NHWC in the VAE's scaled space. Traceable; see :func:`_compiled`."""
    keys = inputs["keys"]
    noise = inputs.get("noise")
    if noise is None:
        shape = (*plan.latent_size, model.vae.config.latent_channels)
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(_image_keys(keys, 0))
    schedule = make_schedule(model.scheduler, plan.sampler, plan.num_steps, plan.sigma_schedule)
    start, end = _start_and_end(plan, schedule, inputs)
    init_latents, extra_channels, blend_step = _image_conditioning(model, plan, params, inputs, schedule, noise)

    if plan.task == "latent_image":
        x = init_latents  # SDXL refiner hand-off: the base's latents, already at this step's noise level
    elif init_latents is not None and not plan.start_from_noise:
        x = add_noise(schedule, init_latents, noise, start)
    else:
        x = noise * schedule.init_noise_sigma

    def post_step(i: jax.Array, x: jax.Array) -> jax.Array:
        jax.debug.callback(_report_progress, i)
        return x if blend_step is None else blend_step(i, x)

    model_fn = _guided_model(model, plan, params, inputs, extra_channels)
    return sample(model_fn, x, schedule, keys=_image_keys(keys, 1), eta=inputs.get("eta"), start_step=start,
                  end_step=end, post_step=post_step)


@functools.lru_cache(maxsize=32)
def _compiled(model: Model, plan: Plan) -> Callable:
    return jax.jit(functools.partial(denoise, model, plan))


# The loop reports each finished step to the host; the reporter of the run in progress (if any) shows it.
_progress: dict[str, Any] = {"report": None, "last": -1, "total": 0}


def _report_progress(i: jax.Array) -> None:
    step = int(i)
    report = _progress["report"]
    # Under SPMD the callback runs once per device: report each step once.
    if report is not None and step > _progress["last"]:
        _progress["last"] = step
        report(step + 1, _progress["total"])


@functools.lru_cache(maxsize=8)
def _decoder(vae: AutoencoderKL) -> Callable:
    def decode(params: Any, latents: jax.Array) -> jax.Array:
        pixels = vae.apply({"params": params}, unscale_latents(latents, vae.config).astype(vae.dtype),
                           method=AutoencoderKL.decode)
        return jnp.clip(pixels.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)

    return jax.jit(decode)


# --- the host side ----------------------------------------------------------------------------------------


def _as_list(value: str | Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the batch has {n} prompts")
    return values


def check_size(pipe: Any, height: int, width: int) -> None:
    f = pipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % f:
            raise ValueError(f"{name}={value!r}: image sizes must be positive multiples of {f} for this model")


def check_options(pipe: Any, *, sampler: str, num_steps: int, clip_skip: int | None, output: str) -> None:
    get_sampler(sampler)  # one ValueError listing the valid names
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of: {', '.join(OUTPUTS)}")
    if clip_skip is not None:
        layers = min(enc.config.num_hidden_layers for enc in pipe.text_encoders.values())
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers - 1:
            raise ValueError(f"clip_skip={clip_skip!r}: must be an integer from 0 to {layers - 2} for this model")


def run(
    pipe: Any,
    *,
    task: str,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None,
    num_steps: int,
    guidance_scale: float,
    sampler: str,
    schedule: str | None,
    seed: int,
    latents: Any,
    clip_skip: int | None,
    guidance_rescale: float,
    eta: float | None,
    output: str,
    height: int | None = None,
    width: int | None = None,
    image: Any = None,
    mask: Any = None,
    strength: float = 1.0,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] | None = None,
    negative_target_size: tuple[int, int] | None = None,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    mesh: Any = None,
    image_index_offset: int = 0,
) -> Any:
    """Shared by every task: validate, tokenize, place on devices, run the jitted core, decode."""
    check_options(pipe, sampler=sampler, num_steps=num_steps, clip_skip=clip_skip, output=output)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt is empty: give a string or a non-empty list of strings")
    batch = len(prompts)
    inputs: dict[str, Any] = {}
    f = pipe.vae_scale_factor

    task_kind = task
    if task in ("image", "inpaint"):
        if image is None:
            raise ValueError(f"{task} needs an image")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        arr = None if isinstance(image, str) else np.asarray(image) if not _is_pil(image) else None
        if arr is not None and arr.ndim == 4 and arr.shape[1] == pipe.vae.config.latent_channels:
            # Latents in diffusers' layout, e.g. from an SDXL base with output="latent".
            task_kind = "latent_image"
            inputs["image"] = np.ascontiguousarray(arr.transpose(0, 2, 3, 1), dtype=np.float32)
        else:
            pixels = images.to_array(images.resize_to_multiple(image, f))
            inputs["image"] = pixels
        if inputs["image"].shape[0] not in (1, batch):
            raise ValueError(f"{inputs['image'].shape[0]} images for {batch} prompts")
        inputs["image"] = np.broadcast_to(inputs["image"], (batch,) + inputs["image"].shape[1:])
        scale = f if task_kind == "latent_image" else 1  # latents are 1/f of the pixel size
        height, width = inputs["image"].shape[1] * scale, inputs["image"].shape[2] * scale
    if task == "inpaint":
        if mask is None:
            raise ValueError("inpaint needs a mask")
        m = images.to_array(images.resize_to_multiple(mask, f), grayscale=True)
        if m.shape[1:3] != (height, width):
            raise ValueError(f"the mask is {m.shape[2]}x{m.shape[1]} but the image is {width}x{height}; "
                             "they must have the same size")
        if m.shape[0] not in (1, batch):
            raise ValueError(f"{m.shape[0]} masks for {batch} prompts")
        inputs["mask"] = np.broadcast_to((m >= 0.5).astype(np.float32), (batch,) + m.shape[1:])
    height = height or pipe.default_size
    width = width or pipe.default_size
    check_size(pipe, height, width)
    latent_size = (height // f, width // f)

    cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    negatives = _as_list(negative_prompt, batch, "negative_prompt")
    zero_uncond = cfg and pipe.is_sdxl and negatives is None and pipe.force_zeros_for_empty_prompt
    inputs["ids"] = _token_ids(pipe, prompts, _as_list(prompt_2, batch, "prompt_2"))
    if cfg and not zero_uncond:
        negatives = negatives or [""] * batch
        inputs["uncond_ids"] = _token_ids(pipe, negatives, _as_list(negative_prompt_2, batch, "negative_prompt_2"))
    # One chunk count for the whole request (prompts longer than 75 tokens have several): one context length.
    inputs["ids"], uncond = text.equal_chunks(pipe, inputs["ids"], inputs.get("uncond_ids"))
    if uncond is not None:
        inputs["uncond_ids"] = uncond
    if pipe.is_sdxl:
        size = (height, width)
        original, target = original_size or size, target_size or size
        neg_original = negative_original_size or original
        neg_crops = negative_crops_coords_top_left or crops_coords_top_left
        neg_target = negative_target_size or target
        if pipe.requires_aesthetics_score:
            ids = (*original, *crops_coords_top_left, aesthetic_score)
            uncond = (*neg_original, *neg_crops, negative_aesthetic_score)
        else:
            ids, uncond = (*original, *crops_coords_top_left, *target), (*neg_original, *neg_crops, *neg_target)
        inputs["time_ids"] = np.tile(np.asarray(ids, np.float32), (batch, 1))
        inputs["uncond_time_ids"] = np.tile(np.asarray(uncond, np.float32), (batch, 1))
    if latents is not None:
        noise = np.asarray(latents, np.float32)
        expected = (batch, pipe.vae.config.latent_channels, *latent_size)
        if noise.shape != expected:
            raise ValueError(f"latents has shape {noise.shape}; expected {expected} (batch, channels, h/{f}, w/{f})")
        inputs["noise"] = noise.transpose(0, 2, 3, 1)
    inputs["keys"] = np.asarray(parallel.image_keys(seed, image_index_offset + np.arange(batch)))
    inputs["guidance_scale"] = np.float32(guidance_scale)
    inputs["guidance_rescale"] = np.float32(guidance_rescale)
    if eta is not None:
        inputs["eta"] = np.float32(eta)
    if task in ("image", "inpaint") and task_kind != "latent_image":
        inputs["strength"] = np.float32(strength)
    elif task_kind == "latent_image" and denoising_start is None:
        inputs["strength"] = np.float32(strength)

    plan = Plan(sampler=sampler, sigma_schedule=schedule, num_steps=num_steps, latent_size=latent_size,
                clip_skip=clip_skip, cfg=cfg, zero_uncond=zero_uncond, task=task_kind,
                start_from_noise=task == "inpaint" and strength == 1.0, denoising_start=denoising_start,
                denoising_end=denoising_end)
    latents_out = _run_on_devices(pipe, plan, inputs, batch, progress, mesh)
    if output == "latent":
        return np.asarray(latents_out).transpose(0, 3, 1, 2)
    pixels = np.asarray(_decoder(pipe.vae)(pipe.params["vae"], latents_out))
    return images.to_pil(pixels) if output == "pil" else pixels


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or (isinstance(x, Sequence) and bool(x) and isinstance(x[0], Image.Image))


def _token_ids(pipe: Any, prompts: list[str], prompts_2: list[str] | None) -> dict[str, np.ndarray]:
    ids = {}
    for name in pipe.text_encoders:
        ids[name] = text.token_ids(pipe, prompts_2 if (name == "text_encoder_2" and prompts_2) else prompts, name)
    return ids


def _run_on_devices(pipe: Any, plan: Plan, inputs: dict[str, Any], batch: int,
                    progress: Callable[[int, int], None] | None, mesh: Any) -> jax.Array:
    """Pad the batch to the device count, shard it over the ``data`` mesh, run, and drop the padding."""
    mesh = mesh or parallel.data_mesh()
    size = parallel.padded_size(batch, mesh)
    shared = {k: inputs.pop(k) for k in SHARED_INPUTS if k in inputs}
    batched = jax.device_put(parallel.pad_batch(inputs, size), parallel.batch_sharded(mesh))
    shared = jax.device_put(shared, parallel.replicated(mesh))
    if mesh not in pipe.device_params:
        pipe.device_params.clear()  # one placement at a time: params can be gigabytes
        pipe.device_params[mesh] = jax.device_put(pipe.params, parallel.replicated(mesh))
    params = pipe.device_params[mesh]
    _progress.update(report=progress, last=-1, total=plan.num_steps)
    try:
        out = _compiled(Model.of(pipe), plan)(params, {**batched, **shared})
        out.block_until_ready()
    finally:
        _progress.update(report=None)
    if not out.is_fully_addressable:
        # Several hosts (jax.distributed): every process passed the whole request; gather the images to each.
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    return out[:batch]
