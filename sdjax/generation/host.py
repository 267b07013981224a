"""The host side of generation: a :class:`Request` checked against the model, tokenized and placed on devices.

``prepare(pipe, request)`` gives the static :class:`Plan`, the traced :class:`Inputs` and the guidance method
(checked against the sampler); ``execute`` runs the jitted core over a ``"data"`` mesh; ``run`` does both
and decodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sdjax import compile_cache, images, parallel, text
from sdjax.generation import conditioning, core
from sdjax.generation.core import COND, EMPTY, INPAINT, LATENT_IMAGE, TEXT, UNCOND, Inputs, Model, Plan
from sdjax.generation.request import Request
from sdjax.guidance import Conditional, Method, as_arrays, composable_passes
from sdjax.samplers import get_sampler
from sdjax.tiled_vae import decode_latents, should_tile

TASK_OF_REQUEST = {"text": TEXT, "image": core.IMAGE, "inpaint": INPAINT}


@dataclasses.dataclass(frozen=True)
class Prepared:
    plan: Plan
    inputs: Inputs
    method: Method
    batch: int


def check_size(pipe: Any, height: int, width: int) -> None:
    f = pipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % f:
            raise ValueError(f"{name}={value!r}: image sizes must be positive multiples of {f} for this model")


def check_clip_skip(pipe: Any, clip_skip: int | None) -> None:
    """diffusers takes any clip_skip that leaves at least the embeddings' output: hidden_states[-(k + 1)]."""
    if clip_skip is None:
        return
    layers = min(enc.config.num_hidden_layers for enc in pipe.text_encoders.values())
    # SDXL counts from the penultimate layer (hidden_states[-(k + 2)]); SD1/SD2 from the last.
    most = layers - 1 if pipe.is_sdxl else layers
    if not 0 <= clip_skip <= most:
        raise ValueError(f"clip_skip={clip_skip!r}: must be an integer from 0 to {most} for this model")


def _as_list(value: str | Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the batch has {n} prompts")
    return values


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or (isinstance(x, Sequence) and bool(x) and isinstance(x[0], Image.Image))


def with_request_ip_adapters(pipe: Any, request: Request) -> Any:
    """``pipe`` with the weights of the IP-Adapters ``request`` names (``ip_adapter=``) that it lacks, for this
    call (``pipe.with_ip_adapter`` once is cheaper)."""
    for adapter in request.ip_adapter.adapters if request.ip_adapter else ():
        if not any(adapter is a for a in pipe.ip_adapters):
            pipe = pipe.with_ip_adapter(adapter)
    return pipe


def prepare(pipe: Any, request: Request, *, image_index_offset: int = 0) -> Prepared:
    """Check ``request`` against ``pipe`` and build the plan, the inputs (numpy, unplaced) and the method."""
    r = request
    batch = r.batch
    f = pipe.vae_scale_factor
    if r.sdxl_given and not pipe.is_sdxl:  # passed at all, even at its default: diffusers' SD pipelines refuse it
        given = [k.name for k in dataclasses.fields(r.sdxl) if k.name in r.sdxl_given]
        raise TypeError(f"{', '.join(given)}: SDXL-only options, but this is not an SDXL model")
    spec = get_sampler(r.sampler)
    check_clip_skip(pipe, r.clip_skip)
    task = TASK_OF_REQUEST[r.task]
    height, width = r.height, r.width
    image = mask = None
    if r.task in ("image", "inpaint"):
        arr = None if _is_pil(r.image) else np.asarray(r.image)
        if arr is not None and arr.ndim == 4 and arr.shape[1] == pipe.vae.config.latent_channels:
            if r.task == "inpaint":  # the mask and the masked image are in pixels: latents would drop the mask
                raise ValueError(f"image has shape {arr.shape}, latents: inpaint takes images (PIL, or arrays "
                                 "(B, H, W, 3) in [0, 1]); latents as image are for image_to_image")
            task = LATENT_IMAGE  # latents in diffusers' layout, e.g. from an SDXL base with output="latent"
            image = np.ascontiguousarray(arr.transpose(0, 2, 3, 1), dtype=np.float32)
        else:
            image = images.to_array(images.resize_to_multiple(r.image, f))
        if image.shape[0] not in (1, batch):
            raise ValueError(f"{image.shape[0]} images for {batch} prompts")
        image = np.broadcast_to(image, (batch,) + image.shape[1:])
        scale = f if task == LATENT_IMAGE else 1  # latents are 1/f of the pixel size
        height, width = image.shape[1] * scale, image.shape[2] * scale
    if r.task == "inpaint":
        m = images.to_array(images.resize_to_multiple(r.mask, f), grayscale=True)
        if m.shape[1:3] != (height, width):
            raise ValueError(f"the mask is {m.shape[2]}x{m.shape[1]} but the image is {width}x{height}; "
                             "they must have the same size")
        if m.shape[0] not in (1, batch):
            raise ValueError(f"{m.shape[0]} masks for {batch} prompts")
        mask = np.broadcast_to((m >= 0.5).astype(np.float32), (batch,) + m.shape[1:])
    elif pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels + 1:
        raise ValueError("this is an inpainting model (9-channel UNet): use inpaint() with a mask")
    noise = None
    if r.latents is not None:
        noise = r.latents
        channels = pipe.vae.config.latent_channels
        if noise.ndim != 4 or noise.shape[0] != batch or noise.shape[1] != channels:
            raise ValueError(f"latents has shape {noise.shape}; expected ({batch}, {channels}, h/{f}, w/{f})")
        implied = (noise.shape[2] * f, noise.shape[3] * f)
        given = (height or implied[0], width or implied[1])
        if given != implied:
            expected = (batch, channels, given[0] // f, given[1] // f)
            raise ValueError(f"latents has shape {noise.shape}; expected {expected} (batch, channels, h/{f}, w/{f})")
        height, width = implied  # as diffusers: the latents' size decides when no size is given
        noise = noise.transpose(0, 2, 3, 1)
    height = height or pipe.default_size
    width = width or pipe.default_size
    check_size(pipe, height, width)
    latent_size = (height // f, width // f)
    _check_memory(pipe, batch, height, width)

    method = r.guidance
    lcm_scale = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        # LCM embeds the guidance scale in its UNet and runs one pass (diffusers' LCM pipelines).
        if r.guidance_scale is None:
            raise ValueError("an LCM UNet embeds one guidance scale: give a number as guidance_scale, "
                             "not a guidance method")
        lcm_scale = np.float32(r.guidance_scale)
        method = Conditional()
    method = method.check(spec)
    prompts_2 = _as_list(r.sdxl.prompt_2, batch, "prompt_2")
    prompt_texts, and_weights = ({}, None) if r.embeds is not None else conditioning.prompt_passes(
        list(r.prompts), prompts_2, r.num_steps, r.hires_prompt_steps)
    passes = method.passes()
    if and_weights is not None:  # AND: the prompt's parts, each its own pass (core wraps the method)
        passes = composable_passes(passes, and_weights.shape[1])
    negatives = None if r.negative_prompts is None else list(r.negative_prompts)
    zero_passes: tuple[str, ...] = ()
    if pipe.is_sdxl and pipe.force_zeros_for_empty_prompt:
        # diffusers zeroes the negative only when neither its text nor its embeddings are given
        given_negative = r.embeds is not None and r.embeds.negative_prompt_embeds is not None
        if UNCOND in passes and negatives is None and not given_negative:
            zero_passes += (UNCOND,)
        if EMPTY in passes:
            zero_passes += (EMPTY,)
    tokens = lambda texts, texts_2=None: text.prompt_tokens(pipe, texts, texts_2, emphasis=r.emphasis)  # noqa: E731
    embeds = _given_embeds(pipe, r, passes, zero_passes)
    texts: dict[str, conditioning.PassTexts] = {}
    if COND not in embeds:
        texts.update(prompt_texts)
    if UNCOND in passes and UNCOND not in zero_passes and UNCOND not in embeds:
        negatives_2 = _as_list(r.sdxl.negative_prompt_2, batch, "negative_prompt_2")
        texts[UNCOND] = conditioning.schedule_pass(negatives or [""] * batch, negatives_2, r.num_steps,
                                                   r.hires_prompt_steps)
    if EMPTY in passes and EMPTY not in zero_passes:
        texts[EMPTY] = conditioning.PassTexts([""] * batch, None, 1, None)
    ids = {name: tokens(t.texts, t.texts_2) for name, t in texts.items()}
    # every pass gets one chunk count (the longest prompt's): the UNet's context has one sequence length
    ids = dict(zip(ids, text.equal_chunks(pipe, *ids.values()), strict=True))
    if embeds and ids:
        ids = _pad_to_embeds(pipe, ids, embeds[COND][0].shape[1])
    ids, prompt_steps = _stack_scheduled(ids, texts, batch)
    time_ids = None
    if pipe.is_sdxl:
        time_ids = _time_ids(pipe, r, height, width, batch)
    sweep = r.sweep
    eta = spec.default_eta if r.eta is None else r.eta
    strength = None
    if r.task in ("image", "inpaint") and (task != LATENT_IMAGE or r.denoising_start is None):
        strength = np.float32(r.strength)
    control, control_plan = _control_inputs(r, height, width, batch)
    if r.adapter is not None and r.adapter.conditioning_factor != 1.0 and not pipe.is_sdxl:
        raise ValueError("adapter_conditioning_factor: only SDXL's adapter pipeline has it (diffusers' SD one "
                         "adds the features at every step)")
    adapter, adapter_plan = _adapter_inputs(r, height, width, batch)
    ip = _ip_adapter_inputs(pipe, r, batch)
    inputs = Inputs(
        keys=np.asarray(parallel.image_keys(r.seed, image_index_offset + np.arange(batch))),
        ids=ids, embeds=embeds or None, eta=np.float32(eta), time_ids=time_ids, noise=noise, image=image,
        mask=mask, strength=strength, lcm_scale=lcm_scale, **control, **adapter, **ip,
        prompt_steps=prompt_steps, cond_weights=and_weights,
    )
    plan = Plan(sampler=r.sampler, sigma_schedule=r.schedule, num_steps=r.num_steps, latent_size=latent_size,
                clip_skip=r.clip_skip, emphasis=r.emphasis, passes=passes, zero_passes=zero_passes, task=task,
                start_from_noise=r.task == "inpaint" and r.strength == 1.0, denoising_start=r.denoising_start,
                denoising_end=r.denoising_end, sweep=sweep, **control_plan, **adapter_plan)
    return Prepared(plan, inputs, as_arrays(method), batch)


def _given_embeds(pipe: Any, r: Request, passes: tuple[str, ...], zero_passes: tuple[str, ...]
                  ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """{pass: (context, pooled)} from prompt_embeds= and friends (diffusers' layouts), checked against the model."""
    e = r.embeds
    if e is None:
        return {}
    width = pipe.unet.config.cross_attention_dim
    if e.prompt_embeds.shape[-1] != width:
        raise ValueError(f"prompt_embeds has width {e.prompt_embeds.shape[-1]}; this UNet's context is {width} wide")
    if pipe.is_sdxl and e.pooled_prompt_embeds is None:
        raise ValueError("an SDXL model needs pooled_prompt_embeds with prompt_embeds")
    out = {COND: (e.prompt_embeds, e.pooled_prompt_embeds if pipe.is_sdxl else None)}
    if UNCOND in passes and UNCOND not in zero_passes and e.negative_prompt_embeds is not None:
        if pipe.is_sdxl and e.negative_pooled_prompt_embeds is None:
            raise ValueError("an SDXL model needs negative_pooled_prompt_embeds with negative_prompt_embeds")
        out[UNCOND] = (e.negative_prompt_embeds, e.negative_pooled_prompt_embeds if pipe.is_sdxl else None)
    return out


def _stack_scheduled(ids: dict[str, Any], texts: dict[str, conditioning.PassTexts], batch: int
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Passes whose text changes during sampling: tokens (B * M, L) -> (B, M, L), with their step tables."""
    steps = {name: t.steps for name, t in texts.items() if t.steps is not None}
    for name in steps:
        ids[name] = {enc: text.Tokens(*(np.asarray(a).reshape(batch, texts[name].count, -1) for a in t))
                     for enc, t in ids[name].items()}
    return ids, steps or None


def _pad_to_embeds(pipe: Any, ids: dict[str, Any], length: int) -> dict[str, Any]:
    """Text-encoded passes padded to the given embeddings' sequence length (77 tokens a chunk)."""
    have = next(iter(next(iter(ids.values())).values())).chunks
    if length % 77 or length // 77 < have:
        raise ValueError(f"prompt_embeds has sequence length {length}; the text-encoded passes need a multiple of "
                         f"77 of at least {77 * have}: give negative_prompt_embeds too")
    return {name: {enc: text.pad_to_chunks(t, length // 77, pipe.text_encoders[enc].tokenizer)
                   for enc, t in per_pass.items()} for name, per_pass in ids.items()}


def _check_memory(pipe: Any, batch: int, height: int, width: int) -> None:
    """Refuse a request whose activations cannot fit, before anything is traced or allocated."""
    from sdjax.activation_memory import check_fits
    from sdjax.tiled_vae import default_tile, should_tile

    per_device = -(-batch // max(jax.device_count(), 1))
    tile = default_tile(pipe.vae.config) if should_tile(height, width) else None
    check_fits(pipe, per_device, height, width, vae_tile=tile)


def _per_prompt(images: np.ndarray, batch: int, name: str) -> np.ndarray:
    if images.shape[0] not in (1, batch):
        raise ValueError(f"{name}: {images.shape[0]} images for {batch} prompts (give one, or one per prompt)")
    return np.ascontiguousarray(np.broadcast_to(images, (batch,) + images.shape[1:]))


def _control_inputs(r: Request, height: int, width: int, batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """ControlNet fields of (Inputs, Plan): control images as diffusers prepares them, params, traced numbers."""
    c = r.control
    if c is None:
        return {}, {}
    from sdjax.control import effective_guess_mode, prepare_control_image

    images = tuple(_per_prompt(prepare_control_image(im, height, width, batch, 1), batch, "control_image")
                   for im in c.images)
    inputs = dict(control_images=images, control_params=tuple(n.params for n in c.nets),
                  control_scales=np.asarray(c.scales, np.float32), control_starts=np.asarray(c.starts, np.float32),
                  control_ends=np.asarray(c.ends, np.float32))
    plan = dict(controlnets=tuple(n.module for n in c.nets), guess_mode=effective_guess_mode(list(c.nets),
                                                                                              c.guess_mode))
    return inputs, plan


def _adapter_inputs(r: Request, height: int, width: int, batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    a = r.adapter
    if a is None:
        return {}, {}
    from sdjax.t2i_adapter import prepare_adapter_image

    images = []
    for adapter, im in zip(a.adapters, a.images, strict=True):
        arr = _per_prompt(prepare_adapter_image(im, height, width), batch, "adapter_image")
        if arr.shape[-1] != adapter.config.in_channels:
            raise ValueError(f"adapter_image has {arr.shape[-1]} channels; this T2I-Adapter takes "
                             f"{adapter.config.in_channels} (an 'L' image for sketch adapters, RGB otherwise)")
        images.append(arr)
    inputs = dict(adapter_images=tuple(images), adapter_params=tuple(ad.params for ad in a.adapters),
                  adapter_scales=np.asarray(a.scales, np.float32), adapter_factor=np.float32(a.conditioning_factor))
    return inputs, dict(adapters=tuple(ad.module for ad in a.adapters))


def ip_adapters_of(pipe: Any, r: Request) -> tuple[Any, ...]:
    """The IP-Adapters a request runs with: the pipeline's (``with_ip_adapter``; ``ip_adapter=`` on a task
    call makes such a pipeline for the call)."""
    adapters = tuple(getattr(pipe, "ip_adapters", ()))
    missing = [a for a in (r.ip_adapter.adapters if r.ip_adapter else ()) if not any(a is b for b in adapters)]
    if missing:
        raise ValueError("ip_adapter: these adapters' weights are not in this pipeline's UNet; use "
                         "pipe.with_ip_adapter(adapter) (the task methods do this for ip_adapter=)")
    return adapters


def _ip_adapter_inputs(pipe: Any, r: Request, batch: int) -> dict[str, Any]:
    """Image tokens of every IP-Adapter for the conditional pass and the others (diffusers' encode_image: the
    unconditional embedding is zeros, or for Plus adapters the encoding of a zero image)."""
    adapters = ip_adapters_of(pipe, r)
    if not adapters:
        return {}
    o = r.ip_adapter
    if o is None:
        raise ValueError("this pipeline has IP-Adapters (with_ip_adapter): give ip_adapter_image=")
    if len(o.images) != len(adapters):
        raise ValueError(f"ip_adapter_image has {len(o.images)} entries for {len(adapters)} IP-Adapters "
                         "(one image, or list of images, per adapter)")
    scales = o.scales if o.scales is not None else tuple(a.scale for a in adapters)
    if len(scales) == 1:
        scales = scales * len(adapters)
    if len(scales) != len(adapters):
        raise ValueError(f"ip_adapter_scale has {len(scales)} values for {len(adapters)} IP-Adapters")
    from sdjax.ip_adapter import encode_image, ip_adapter_tokens

    tokens: dict[str, list[np.ndarray]] = {COND: [], UNCOND: []}
    for adapter, image in zip(adapters, o.images, strict=True):
        if adapter.image_encoder is None:
            raise ValueError("an IP-Adapter was loaded without an image encoder: give image_encoder=FOLDER")
        cond, uncond = encode_image(adapter, image)
        for name, embeds in ((COND, cond), (UNCOND, uncond)):
            t = np.asarray(ip_adapter_tokens(adapter, embeds[None]))  # (1, images, T, C): every prompt's
            tokens[name].append(np.ascontiguousarray(np.broadcast_to(t, (batch,) + t.shape[1:])))
    return dict(ip_tokens={k: tuple(v) for k, v in tokens.items()}, ip_scales=np.asarray(scales, np.float32))


def split(prepared: Prepared) -> list[Prepared]:
    """One :class:`Prepared` per image: the batched inputs sliced, the rest shared. Each keeps its own key,
    so an image made from its slice (alone or in any batch) is the image of the whole request."""
    if prepared.plan.sweep is not None:
        raise ValueError("a guidance sweep (a list of settings) cannot be split into single images")
    parts = []
    for i in range(prepared.batch):
        fields = {}
        for field in dataclasses.fields(Inputs):
            value = getattr(prepared.inputs, field.name)
            if value is not None and Inputs.is_batched(field.name):
                value = jax.tree.map(lambda x, i=i: np.asarray(x)[i:i + 1], value)
            fields[field.name] = value
        parts.append(Prepared(prepared.plan, Inputs(**fields), prepared.method, 1))
    return parts


def batch_key(prepared: Prepared) -> Any:
    """Hashable: equal for preparations that can run as one batch of one compiled call (same plan, same shapes
    of the batched inputs, equal replicated inputs and guidance numbers)."""
    batched, shared = {}, {}
    for field in dataclasses.fields(Inputs):
        value = getattr(prepared.inputs, field.name)
        (batched if Inputs.is_batched(field.name) else shared)[field.name] = value
    shapes = jax.tree.map(lambda x: (np.shape(x)[1:], np.asarray(x).dtype.str), batched)
    leaves, treedef = jax.tree.flatten((shared, prepared.method))
    values = tuple((np.asarray(v).dtype.str, np.shape(v), np.asarray(v).tobytes()) for v in leaves)
    return prepared.plan, str(jax.tree.structure(batched)), str(shapes), str(treedef), values


def concat(parts: Sequence[Prepared]) -> Prepared:
    """Several preparations with one :func:`batch_key` as one batch, in order (batched inputs concatenated)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = batch_key(parts[0])
    if any(batch_key(p) != first for p in parts[1:]):
        raise ValueError("these requests cannot share a batch: their plans, shapes or shared settings differ")
    fields = {}
    for field in dataclasses.fields(Inputs):
        values = [getattr(p.inputs, field.name) for p in parts]
        if values[0] is not None and Inputs.is_batched(field.name):
            fields[field.name] = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *values)
        else:
            fields[field.name] = values[0]
    return Prepared(parts[0].plan, Inputs(**fields), parts[0].method, sum(p.batch for p in parts))


def _time_ids(pipe: Any, r: Request, height: int, width: int, batch: int) -> dict[str, np.ndarray]:
    o = r.sdxl
    size = (height, width)
    original, target = o.original_size or size, o.target_size or size
    neg_original = o.negative_original_size or original
    neg_crops = o.negative_crops_coords_top_left or o.crops_coords_top_left
    neg_target = o.negative_target_size or target
    if pipe.requires_aesthetics_score:
        ids = (*original, *o.crops_coords_top_left, o.aesthetic_score)
        uncond = (*neg_original, *neg_crops, o.negative_aesthetic_score)
    else:
        ids, uncond = (*original, *o.crops_coords_top_left, *target), (*neg_original, *neg_crops, *neg_target)
    return {COND: np.tile(np.asarray(ids, np.float32), (batch, 1)),
            UNCOND: np.tile(np.asarray(uncond, np.float32), (batch, 1))}


ADDON_PARAMS = ("control_params", "adapter_params")  # ControlNet / T2I-Adapter params: placed once per mesh
_addon_cache: dict[tuple[int, Any], tuple[Any, Any]] = {}


def _placed_addon(params: Any, mesh: Any) -> Any:
    """An add-on's params on the mesh, cached by identity (the cache holds the params, so ids stay unique)."""
    key = (id(params), mesh)
    if key not in _addon_cache:
        if len(_addon_cache) >= 8:
            _addon_cache.pop(next(iter(_addon_cache)))
        _addon_cache[key] = (params, jax.device_put(params, parallel.replicated(mesh)))
    return _addon_cache[key][1]


def place(pipe: Any, prepared: Prepared, mesh: Any) -> tuple[Any, Inputs, Method]:
    """(params, inputs, method) on the mesh: batched inputs padded and sharded, the rest replicated."""
    size = parallel.padded_size(prepared.batch, mesh)
    placed = {}
    for field in dataclasses.fields(Inputs):
        value = getattr(prepared.inputs, field.name)
        if value is None:
            placed[field.name] = None
        elif Inputs.is_batched(field.name):
            placed[field.name] = jax.device_put(parallel.pad_batch(value, size), parallel.batch_sharded(mesh))
        elif field.name in ADDON_PARAMS:
            placed[field.name] = tuple(_placed_addon(p, mesh) for p in value)
        else:
            placed[field.name] = jax.device_put(value, parallel.replicated(mesh))
    method = jax.device_put(prepared.method, parallel.replicated(mesh))
    if mesh not in pipe.device_params:
        pipe.device_params.clear()  # one placement at a time: params can be gigabytes
        pipe.device_params[mesh] = parallel.place_params(pipe.params, mesh)
    return pipe.device_params[mesh], Inputs(**placed), method


def execute(pipe: Any, prepared: Prepared, *, mesh: Any = None, progress: Callable[[int, int], None] | None = None
            ) -> jax.Array:
    """Run the jitted core over the ``data`` mesh; returns the latents without the padding."""
    mesh = mesh or parallel.data_mesh()
    params, inputs, method = place(pipe, prepared, mesh)
    model, plan = Model.of(pipe), prepared.plan
    # Step-by-step progress needs a host callback in the loop, which JAX can neither cache nor serialize: with
    # the compile cache on, the loop runs without it and the steps are reported when it finishes.
    step_progress = progress is not None and compile_cache.directory() is None
    args = (params, inputs, method)
    if step_progress:
        fn = core._compiled(model, plan, True)
    else:
        fn = compile_cache.compiled("denoise", (model, plan), core._compiled(model, plan), args)
    core._progress.update(report=progress if step_progress else None, last=-1, total=plan.num_steps)
    try:
        out = fn(*args)
        out.block_until_ready()
    finally:
        core._progress.update(report=None)
    if progress is not None and not step_progress:
        for step in range(plan.num_steps):
            progress(step + 1, plan.num_steps)
    if not out.is_fully_addressable:
        # Several hosts (jax.distributed): every process passed the whole request; gather the images to each.
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=prepared.plan.sweep is None)
    return out[..., :prepared.batch, :, :, :]


def decode(pipe: Any, latents: jax.Array, output: str) -> Any:
    """Final latents -> the requested output: (B, H, W, 3) float32, PIL images, or diffusers-layout latents.
    A sweep's leading axis K stays in front (PIL: a list of K lists)."""
    lead = latents.shape[:-3]
    if output == "latent":
        return np.moveaxis(np.asarray(latents), -1, -3)
    flat = latents.reshape((-1,) + latents.shape[-3:])
    f = pipe.vae_scale_factor
    if should_tile(flat.shape[1] * f, flat.shape[2] * f):  # large images: overlapping tiles, bounded memory
        pixels = np.asarray(decode_latents(pipe.vae, pipe.params["vae"], flat))
    else:
        args = (pipe.params["vae"], flat)
        pixels = np.asarray(compile_cache.compiled("decode", pipe.vae, core._decoder(pipe.vae), args)(*args))
    pixels = pixels.reshape(lead + pixels.shape[1:])
    if output == "pil":
        return images.to_pil(pixels) if len(lead) == 1 else [images.to_pil(p) for p in pixels]
    return pixels


def run(pipe: Any, request: Request, *, mesh: Any = None, progress: Callable[[int, int], None] | None = None,
        image_index_offset: int = 0) -> Any:
    """Prepare, execute and decode one request."""
    prepared = prepare(pipe, request, image_index_offset=image_index_offset)
    return decode(pipe, execute(pipe, prepared, mesh=mesh, progress=progress), request.output)
