"""The traced core: one jitted function from token ids, noise and images to final latents.

The three tasks differ only in their initial state and per-step masking:

- text-to-image: pure noise, all steps;
- image-to-image: the VAE-encoded image (or latents given as the image) noised to the step that ``strength``
  picks (SDXL's refiner: the base's latents as they are, from ``denoising_start``);
- inpainting: as image-to-image, plus either the mask and masked image as extra UNet channels (9-channel
  inpainting UNets) or, for ordinary UNets, re-imposing the noised original outside the mask after each step.

Static (one compile each): the model, the :class:`Plan` (sampler, steps, shapes, task, which passes run) and
the guidance method's kind. Traced: params, the :class:`Inputs` pytree and the guidance method's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from sdjax import text
from sdjax.control import diffusers_evaluation
from sdjax.guidance import (
    COND,
    EMPTY,
    UNCOND,
    Composable,
    Method,
    guidance_scale_embedding,
    is_cond,
    stack_passes,
    unstack_passes,
)
from sdjax.guidance.methods import sweep_axes
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL, sample_latent, scale_latents, unscale_latents
from sdjax.samplers import (
    add_noise,
    denoising_end_step,
    denoising_start_step,
    img2img_start_step,
    inpaint_post_step,
    make_schedule,
    sample,
)
from sdjax.samplers.denoiser import takes_evaluation
from sdjax.samplers.schedules import SchedulerConfig

# Tasks as the core sees them.
TEXT, IMAGE, LATENT_IMAGE, INPAINT = "text", "image", "latent_image", "inpaint"  # latent_image: latents as image


class Stream:
    """Per-image random streams: ``fold_in(image_key, stream)``."""

    NOISE = 0  # initial noise
    SAMPLER = 1  # the sampler's own noise (ancestral, SDE)
    IMAGE = 2  # VAE posterior sample of the init image
    MASKED_IMAGE = 3  # VAE posterior sample of the masked image (9-channel inpainting)


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
    emphasis: str  # A1111's emphasis mode for (word:1.2): "original", "no_norm" or "none"
    passes: tuple[str, ...]  # the UNet passes the guidance method may ask for
    zero_passes: tuple[str, ...]  # passes whose text conditioning is zeros (SDXL's force_zeros_for_empty_prompt)
    task: str  # TEXT, IMAGE, LATENT_IMAGE or INPAINT
    start_from_noise: bool = False  # inpainting at strength 1 starts from pure noise, as diffusers does
    denoising_start: float | None = None
    denoising_end: float | None = None
    sweep: int | None = None  # K settings of the guidance method in one run (a leading axis K)
    controlnets: tuple[Any, ...] = ()  # ControlNetModel modules (their params ride in Inputs.control_params)
    guess_mode: bool = False  # ControlNet guess mode (under CFG: the conditional pass only)
    adapters: tuple[Any, ...] = ()  # T2I-Adapter modules (params in Inputs.adapter_params)


def batched(**kwargs: Any) -> Any:
    """A field with the batch first: padded to the device count and sharded over the data axis."""
    return struct.field(metadata={"batched": True}, **kwargs)


@struct.dataclass
class Inputs:
    """The traced inputs of one run. ``batched`` fields have the batch first; the rest are one value for the
    whole batch (replicated on every device)."""

    keys: Any = batched()  # (B, 2) uint32 per-image keys
    ids: Any = batched()  # {pass: token ids per encoder}: the passes encoded from text
    embeds: Any = batched(default=None)  # {pass: (context, pooled or None)}: the passes given as embeddings
    eta: Any = None  # the sampler's eta (always given: its default when the user gives none)
    time_ids: Any = batched(default=None)  # SDXL: {pass: (B, 5 or 6)} micro-conditioning
    noise: Any = batched(default=None)  # (B, h, w, C) starting noise (the user's latents), else drawn from keys
    image: Any = batched(default=None)  # (B, H, W, 3) pixels in [0, 1], or (B, h, w, C) latents (LATENT_IMAGE)
    mask: Any = batched(default=None)  # (B, H, W, 1), 1 = repaint
    strength: Any = None  # image-to-image strength (traced: no recompile)
    lcm_scale: Any = None  # LCM: the guidance scale its UNet embeds (time_cond_proj_dim)
    # ControlNet (one entry per net): images (B, H, W, 3) in [0, 1]; params; traced scales and start/end
    control_images: Any = batched(default=None)
    control_params: Any = None
    control_scales: Any = None  # (n,)
    control_starts: Any = None  # (n,) fractions of the steps run
    control_ends: Any = None
    # T2I-Adapter (one entry per adapter): images (B, H, W, C); params; traced weights and SDXL's factor
    adapter_images: Any = batched(default=None)
    adapter_params: Any = None
    adapter_scales: Any = None  # (n,)
    adapter_factor: Any = None  # features only while the run's step index < int(n_run * factor)
    # IP-Adapter: {pass: tuple of (B, images, T, C) tokens per adapter} (the pipeline's adapters, in order)
    ip_tokens: Any = batched(default=None)
    ip_scales: Any = None  # (n,)
    # Prompt editing / alternation (generation/conditioning.py): {pass: (B, num_steps) int32}, which of the
    # pass's M texts (its ids then (B, M, tokens)) each step of the run uses; AND parts' (B, K) weights.
    prompt_steps: Any = batched(default=None)
    cond_weights: Any = batched(default=None)

    @classmethod
    def is_batched(cls, name: str) -> bool:
        return bool(cls.__dataclass_fields__[name].metadata.get("batched"))


# --- text and image conditioning ----------------------------------------------------------------------------


def _encode_passes(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Inputs
                   ) -> dict[str, tuple[jax.Array, jax.Array | None]]:
    """{pass: (context, pooled)} for every pass the plan may run."""
    encoded = dict(inputs.embeds or {})
    scheduled = inputs.prompt_steps or {}
    for name in plan.passes:
        if name in plan.zero_passes or name in encoded:
            continue
        encode = _encode_stacked if name in scheduled else text.encode_modules
        encoded[name] = encode(model.is_sdxl, model.text_encoders, params, inputs.ids[name], plan.clip_skip,
                               plan.emphasis)
    for name in plan.zero_passes:
        ctx, pooled = _at_step(encoded, scheduled, 0)[COND]
        encoded[name] = (jnp.zeros_like(ctx), None if pooled is None else jnp.zeros_like(pooled))
    return encoded


def _encode_stacked(is_sdxl: bool, encoders: Any, params: Mapping[str, Any], ids: Mapping[str, text.Tokens],
                    clip_skip: int | None, emphasis: str) -> tuple[jax.Array, jax.Array | None]:
    """A scheduled pass: tokens (B, M, n*77), each image's M texts, encoded as one batch of B*M ->
    (context (B, M, S, D), pooled (B, M, P) or None)."""
    b, m = next(iter(ids.values())).ids.shape[:2]
    flat = {name: text.Tokens(*(a.reshape((b * m,) + a.shape[2:]) for a in t)) for name, t in ids.items()}
    ctx, pooled = text.encode_modules(is_sdxl, encoders, params, flat, clip_skip, emphasis)
    return ctx.reshape((b, m) + ctx.shape[1:]), None if pooled is None else pooled.reshape(b, m, -1)


def _at_step(encoded: Mapping[str, Any], scheduled: Mapping[str, jax.Array], index: Any) -> dict[str, Any]:
    """{pass: (context, pooled)} at run step ``index`` (traced): a scheduled pass's context and pooled embedding
    (SDXL: the active text's, as A1111 switches its whole conditioning) picked per image from its table."""
    out = dict(encoded)
    for name, table in scheduled.items():
        if name not in encoded:
            continue
        which = jnp.take(table, index, axis=1)  # (B,)

        def pick(a: jax.Array, which: jax.Array = which) -> jax.Array:
            return jnp.take_along_axis(a, which.reshape((-1, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]

        ctx, pooled = encoded[name]
        out[name] = (pick(ctx), None if pooled is None else pick(pooled))
    return out


def _encode_image(model: Model, params: Mapping[str, Any], image: jax.Array, keys: jax.Array) -> jax.Array:
    """Pixels in [0, 1] (B, H, W, 3) -> scaled latents, sampled from the VAE posterior with each image's key."""
    mean, logvar = model.vae.apply({"params": params["vae"]}, image * 2.0 - 1.0, method=AutoencoderKL.encode)
    z = jax.vmap(lambda m, lv, k: sample_latent(m[None], lv[None], k)[0])(mean, logvar, keys)
    return scale_latents(z, model.vae.config)


def _image_keys(keys: jax.Array, stream: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def _start_and_end(plan: Plan, schedule: Any, inputs: Inputs) -> tuple[Any, Any]:
    """The loop's first and last steps: img2img strength or SDXL's denoising_start / denoising_end."""
    if plan.denoising_start is not None:
        start = denoising_start_step(schedule, plan.denoising_start)
    elif inputs.strength is not None:
        start = img2img_start_step(plan.num_steps, inputs.strength)
    else:
        start = 0
    end = None if plan.denoising_end is None else denoising_end_step(schedule, plan.denoising_end)
    return start, end


def _image_conditioning(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Inputs,
                        schedule: Any, noise: jax.Array) -> tuple[Any, Any, Any]:
    """(clean initial latents, extra UNet input channels, per-step blend) for the image tasks."""
    init_latents = extra_channels = blend_step = None
    if plan.task == LATENT_IMAGE:
        init_latents = inputs.image
    elif plan.task in (IMAGE, INPAINT):
        init_latents = _encode_image(model, params, inputs.image, _image_keys(inputs.keys, Stream.IMAGE))
    if plan.task == INPAINT:
        f = model.vae.config.downsample_factor
        h, w = plan.latent_size
        mask = inputs.mask
        latent_mask = mask[:, ::f, ::f][:, :h, :w]  # torch's nearest-neighbour downsizing
        if model.unet.config.in_channels == 2 * model.vae.config.latent_channels + 1:
            # The masked image has the repainted pixels at 0 in [-1, 1] (mid-grey), as diffusers' and as the
            # inpainting UNets were trained.
            masked_pixels = jnp.where(mask < 0.5, inputs.image, 0.5)
            masked = _encode_image(model, params, masked_pixels, _image_keys(inputs.keys, Stream.MASKED_IMAGE))
            extra_channels = jnp.concatenate([latent_mask, masked], axis=-1)
        else:
            blend_step = inpaint_post_step(schedule, init_latents, noise, latent_mask)
    return init_latents, extra_channels, blend_step


# --- the model seen by the loop ------------------------------------------------------------------------------


def control_keep(index: jax.Array, n_run: jax.Array, starts: jax.Array, ends: jax.Array) -> jax.Array:
    """diffusers' ``controlnet_keep[index]`` over ``n_run`` evaluations, traced: (n,) 1.0 where ControlNet k is
    on (``index / n_run >= start_k`` and ``(index + 1) / n_run <= end_k``), else 0.0."""
    n = jnp.asarray(n_run, jnp.float32)
    j = jnp.asarray(index, jnp.float32)
    off = (j / n < starts) | ((j + 1) / n > ends)
    return 1.0 - off.astype(jnp.float32)


def _adapter_features(plan: Plan, inputs: Inputs) -> tuple[jax.Array, ...] | None:
    """T2I-Adapter features, once per generation: diffusers' (Multi)Adapter weighted sum."""
    if not plan.adapters:
        return None
    total = None
    for k, (module, p, image) in enumerate(zip(plan.adapters, inputs.adapter_params, inputs.adapter_images,
                                               strict=True)):
        feats = [f * inputs.adapter_scales[k].astype(f.dtype) for f in module.apply({"params": p}, image)]
        total = feats if total is None else [a + b for a, b in zip(total, feats, strict=True)]
    return tuple(total)


def _passes_fn(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Inputs,
               extra_channels: jax.Array | None, schedule: Any = None, start: Any = 0) -> Callable:
    """``passes_fn(x_in, t, passes) -> {pass: raw UNet output}``: one UNet call on the image's passes side by
    side ([p0 of image 0, p1 of image 0, ..., p0 of image 1, ...]), with SDXL's / LCM's extra conditioning and
    the ControlNet / T2I-Adapter / IP-Adapter inputs. ``schedule`` and ``start`` (the first step run) place
    ControlNet start/end and the adapter factor, as fractions of the steps run."""
    unet_config = model.unet.config
    all_encoded = _encode_passes(model, plan, params, inputs)
    time_ids = inputs.time_ids or {}
    lcm_emb = None
    if unet_config.time_cond_proj_dim is not None:
        lcm_emb = guidance_scale_embedding(inputs.lcm_scale - 1.0, unet_config.time_cond_proj_dim)
    adapter_features = _adapter_features(plan, inputs)
    n_run = None if schedule is None else schedule.num_steps - jnp.asarray(start, jnp.int32)

    def loop_index(evaluation: tuple[jax.Array, int] | None) -> tuple[jax.Array, jax.Array]:
        """diffusers' loop counter ``i`` and ``len(timesteps)`` for this evaluation (ControlNet start/end)."""
        if evaluation is None or schedule is None:
            raise ValueError("ControlNet start/end and the adapter factor need the schedule and the step")
        step, k = evaluation
        return diffusers_evaluation(plan.sampler, step - jnp.asarray(start, jnp.int32), k, n_run)

    def conditioning(evaluation: tuple[jax.Array, int] | None) -> dict[str, Any]:
        """Each pass's context at this evaluation's loop step (prompt editing; both evaluations of a
        second-order step use the step they belong to)."""
        if not inputs.prompt_steps:
            return all_encoded
        if evaluation is None:
            raise ValueError("prompt editing needs the loop step")
        # a refiner hand-off (denoising_start) continues the base's count, as A1111's refiner keeps its step
        step = evaluation[0] if plan.denoising_start is not None else evaluation[0] - jnp.asarray(start, jnp.int32)
        return _at_step(all_encoded, inputs.prompt_steps, jnp.clip(step, 0, plan.num_steps - 1))

    @takes_evaluation
    def passes_fn(x_in: jax.Array, t: jax.Array, passes: tuple[str, ...],
                  evaluation: tuple[jax.Array, int] | None = None) -> dict[str, jax.Array]:
        count = len(passes)
        encoded = conditioning(evaluation)
        x_cn = x_in  # ControlNets see the 4-channel latents, before an inpainting UNet's extra channels
        if extra_channels is not None:
            x_in = jnp.concatenate([x_in, extra_channels.astype(x_in.dtype)], axis=-1)
        x_all = stack_passes([x_in] * count)
        context = stack_passes([encoded[p][0] for p in passes])
        added = {}
        if model.is_sdxl:
            added = {"text_embeds": stack_passes([encoded[p][1] for p in passes]),
                     "time_ids": stack_passes([time_ids[COND if is_cond(p) else UNCOND] for p in passes])}
        timestep_cond = None
        if lcm_emb is not None:
            timestep_cond = jnp.broadcast_to(lcm_emb, (x_all.shape[0], lcm_emb.shape[-1]))
        ts = jnp.broadcast_to(t, (x_all.shape[0],))
        extra: dict[str, Any] = {}
        if plan.controlnets:
            index, n_eval = loop_index(evaluation)
            keep = control_keep(index, n_eval, inputs.control_starts, inputs.control_ends)
            extra.update(_control_residuals(model, plan, inputs, passes, x_cn, t, encoded, time_ids,
                                            inputs.control_scales * keep))
        if adapter_features is not None:
            # the SDXL adapter pipeline: loop counter i < int(num_inference_steps * factor), steps not evaluations;
            # diffusers' SD adapter pipeline has no factor and adds the features at every evaluation
            on = jnp.float32(1.0)
            if model.is_sdxl:
                on = (loop_index(evaluation)[0] < jnp.floor(n_run * inputs.adapter_factor * (1 + 1e-6))
                      ).astype(jnp.float32)
            extra["down_intrablock_additional_residuals"] = [stack_passes([f * on.astype(f.dtype)] * count)
                                                             for f in adapter_features]
        if inputs.ip_tokens is not None:
            n_ip = len(inputs.ip_tokens[COND])
            extra["ip_adapter_tokens"] = [stack_passes([inputs.ip_tokens[COND if is_cond(p) else UNCOND][j]
                                                        for p in passes]) for j in range(n_ip)]
            extra["ip_adapter_scales"] = inputs.ip_scales
        out = model.unet.apply({"params": params["unet"]}, x_all.astype(model.unet.dtype), ts, context,
                               timestep_cond=timestep_cond, **added, **extra).astype(jnp.float32)
        return dict(zip(passes, unstack_passes(out, count), strict=True))

    return passes_fn


def _control_residuals(model: Model, plan: Plan, inputs: Inputs, passes: tuple[str, ...], x: jax.Array,
                       t: jax.Array, encoded: Mapping[str, Any], time_ids: Mapping[str, Any], scales: jax.Array
                       ) -> dict[str, Any]:
    """The UNet's ControlNet keywords for this evaluation: the nets' summed residuals on every pass, or in guess
    mode on the conditional pass alone with zeros for the others (as diffusers does under CFG)."""
    run_on = tuple(p for p in passes if is_cond(p)) if plan.guess_mode else passes  # guess mode: every AND part
    count = len(run_on)
    x_all = stack_passes([x] * count).astype(model.unet.dtype)
    context = stack_passes([encoded[p][0] for p in run_on])
    added = {}
    if model.is_sdxl:
        added = {"text_embeds": stack_passes([encoded[p][1] for p in run_on]),
                 "time_ids": stack_passes([time_ids[COND if is_cond(p) else UNCOND] for p in run_on])}
    ts = jnp.broadcast_to(t, (x_all.shape[0],))
    down = mid = None
    for k, (module, p, image) in enumerate(zip(plan.controlnets, inputs.control_params, inputs.control_images,
                                               strict=True)):
        d, m = module.apply({"params": p}, x_all, ts, context, stack_passes([image] * count), scales[k],
                            guess_mode=plan.guess_mode, **added)
        down, mid = (list(d), m) if down is None else ([a + b for a, b in zip(down, d, strict=True)], mid + m)
    if run_on != passes:
        def spread(r: jax.Array) -> jax.Array:
            parts = dict(zip(run_on, unstack_passes(r, count), strict=True))
            zeros = jnp.zeros_like(parts[run_on[0]])
            return stack_passes([parts.get(p, zeros) for p in passes])
        down, mid = [spread(r) for r in down], spread(mid)
    return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


def decode_latents(vae: AutoencoderKL, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) -> pixels (B, H, W, 3) float32 in [0, 1]."""
    pixels = vae.apply({"params": vae_params}, unscale_latents(latents, vae.config).astype(vae.dtype),
                       method=AutoencoderKL.decode)
    return jnp.clip(pixels.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


def _decode_fn(model: Model, params: Mapping[str, Any]) -> Callable[[jax.Array], jax.Array]:
    return functools.partial(decode_latents, model.vae, params["vae"])


def denoise(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Inputs, method: Method, *,
            step_progress: bool = False) -> jax.Array:
    """Latents (B, h, w, C) NHWC in the VAE's scaled space ((K, B, ...) for a sweep). Traceable.
    ``step_progress``: report each step to the host (a host callback: such an executable is not cacheable)."""
    if plan.sweep is not None:
        one = functools.partial(_denoise_one, model, dataclasses.replace(plan, sweep=None), params, inputs,
                                step_progress=step_progress)
        return jax.vmap(one, in_axes=(sweep_axes(method),))(method)
    return _denoise_one(model, plan, params, inputs, method, step_progress=step_progress)


def _denoise_one(model: Model, plan: Plan, params: Mapping[str, Any], inputs: Inputs, method: Method, *,
                 step_progress: bool = False) -> jax.Array:
    keys = inputs.keys
    noise = inputs.noise
    if noise is None:
        shape = (*plan.latent_size, model.vae.config.latent_channels)
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(_image_keys(keys, Stream.NOISE))
    schedule = make_schedule(model.scheduler, plan.sampler, plan.num_steps, plan.sigma_schedule)
    start, end = _start_and_end(plan, schedule, inputs)
    init_latents, extra_channels, blend_step = _image_conditioning(model, plan, params, inputs, schedule, noise)

    if plan.task == LATENT_IMAGE and plan.denoising_start is not None:
        x = init_latents  # SDXL refiner hand-off: the base's latents, already at this step's noise level
    elif init_latents is not None and not plan.start_from_noise:
        # Clean latents (encoded pixels, or latents given as the image: diffusers noises those too unless
        # denoising_start is given) noised to the start step.
        x = add_noise(schedule, init_latents, noise, start)
    else:
        x = noise * schedule.init_noise_sigma

    def post_step(i: jax.Array, x: jax.Array) -> jax.Array:
        if step_progress:
            jax.debug.callback(_report_progress, i)
        return x if blend_step is None else blend_step(i, x)

    passes_fn = _passes_fn(model, plan, params, inputs, extra_channels, schedule, start)
    if inputs.cond_weights is not None:  # AND: composable diffusion around the request's guidance method
        method = Composable(method, inputs.cond_weights)
    return sample(passes_fn, x, schedule, guidance=method, keys=_image_keys(keys, Stream.SAMPLER), eta=inputs.eta,
                  start_step=start, end_step=end, post_step=post_step, decode=_decode_fn(model, params))


@functools.lru_cache(maxsize=32)
def _compiled(model: Model, plan: Plan, step_progress: bool = False) -> Callable:
    """``fn(params, inputs, method)``, jitted (a new guidance kind or structure retraces, numbers do not).
    Only ``step_progress=True`` has the host callback; without it the executable can be cached and serialized."""
    return jax.jit(functools.partial(denoise, model, plan, step_progress=step_progress))


# With step_progress the loop reports each finished step to the host; the run's reporter (if any) shows it.
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
    return jax.jit(functools.partial(decode_latents, vae))


__all__ = ["COND", "EMPTY", "INPAINT", "IMAGE", "LATENT_IMAGE", "TEXT", "UNCOND", "Inputs", "Model", "Plan",
           "Stream", "denoise"]
