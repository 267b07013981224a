"""The one sampling loop, and the schedule arithmetic the pipeline needs around it.

Text-to-image::

    schedule = make_schedule(config, "dpmpp_2m", 30, sigmas="karras")
    x = noise * schedule.init_noise_sigma
    x = sample(model_fn, x, schedule, keys=keys)

Image-to-image (strength may be traced)::

    start = img2img_start_step(schedule.num_steps, strength)
    x = add_noise(schedule, init_latents, noise, start)
    x = sample(model_fn, x, schedule, keys=keys, start_step=start)

SDXL base -> refiner: the base runs ``end_step=denoising_end_step(base_schedule, f)`` and returns latents;
the refiner runs from ``start_step=denoising_start_step(refiner_schedule, f)`` on those latents, adding no
noise. Inpainting with a 4-channel UNet: ``post_step=inpaint_post_step(schedule, init_latents, noise, mask)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax.guidance.context import DIAGNOSTICS
from sdjax.guidance.methods import Conditional, Method
from sdjax.samplers.core import Step, check_keys, image_normal
from sdjax.samplers.denoiser import Denoiser, ModelFn, PassesFn, single_pass
from sdjax.samplers.registry import get_sampler
from sdjax.samplers.schedules import Schedule

PostStep = Callable[[jax.Array, jax.Array], jax.Array]
IntLike = int | jax.Array
FloatLike = float | jax.Array


def sample(model_fn: ModelFn | PassesFn, x: jax.Array, schedule: Schedule, *, guidance: Method | None = None,
           keys: jax.Array | None = None, eta: FloatLike | None = None, start_step: IntLike = 0,
           end_step: IntLike | None = None, post_step: PostStep | None = None, diagnostics: bool = False,
           decode: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array | tuple[jax.Array, dict]:
    """Run ``schedule.sampler`` from step ``start_step`` up to (not including) ``end_step`` (default: all).

    ``x``: the latents at ``start_step`` (batch first, any layout), e.g. ``noise * schedule.init_noise_sigma``
    or ``add_noise(...)``; returned after the last step, in the same space (diffusers' ``latents``).
    ``model_fn``: without ``guidance``, ``model_fn(x_in, t) -> output`` (one pass); with it,
    ``model_fn(x_in, t, passes) -> {pass: output}`` (see :mod:`sdjax.samplers.denoiser`).
    ``guidance``: a method from :mod:`sdjax.guidance`, called at every model evaluation with the passes'
    outputs and the step context; its state rides in the loop carry.
    ``keys``: one PRNG key per image, shape (B,) typed or (B, 2) uint32; needed by stochastic samplers (and
    DDIM with eta). Draw j of step i for image b is ``normal(fold_in(fold_in(key_b, i), j))``: an image's
    noise depends on its own key and the step index only, never on batch size or device count.
    ``eta``: ancestral noise scale (DDIM: default 0; Euler a, DPM++ SDE, DPM++ 2M SDE: default 1); ignored by
    the deterministic samplers.
    ``post_step(i, x) -> x``: called after each step i (e.g. :func:`inpaint_post_step`), and by the
    second-order samplers (Heun, DPM2, DPM++ SDE) on their intermediate latents before the second evaluation,
    as diffusers' pipelines apply their per-step blend after every scheduler call.
    ``diagnostics``: also return ``{name: (num_steps, B)}`` per-step numbers of each step's first evaluation
    (``guidance_norm``, ``cond_uncond_cosine``, ``latent_std``; NaN where a step did not run).
    ``decode``: scaled latents -> pixels, for guidance that reads pixels (universal classifier guidance).

    One ``lax.fori_loop`` whose carry is ``(x, sampler_state, guidance_state)``; the keys are not carried since
    the noise is a function of (key, step). Jittable: the schedule's sampler, prediction type and step count
    and the guidance method's kind are static; arrays, x, keys, eta, guidance numbers, start_step and
    end_step are traced.
    """
    spec = get_sampler(schedule.sampler)
    x = jnp.asarray(x, jnp.float32)
    needs_keys = spec.stochastic or (spec.uses_eta and eta is not None)
    if needs_keys and keys is None:
        raise ValueError(f"sampler {spec.name!r} needs keys= (one PRNG key per image) for its noise")
    keys = check_keys(keys, x.shape[0]) if keys is not None and needs_keys else None
    if guidance is None:
        passes_fn, method = single_pass(model_fn), Conditional()
    else:
        passes_fn, method = model_fn, guidance.check(spec)
    sched = jax.tree.map(jnp.asarray, schedule)
    n_steps = schedule.num_steps
    denoiser = Denoiser(passes_fn, schedule.prediction_type, method, n_steps, schedule.num_train_timesteps, decode)
    eta = jnp.asarray(spec.default_eta if eta is None else eta, jnp.float32)
    start = jnp.clip(jnp.asarray(start_step, jnp.int32), 0, n_steps)
    end = jnp.clip(jnp.asarray(n_steps if end_step is None else end_step, jnp.int32), start, n_steps)

    def body(i: jax.Array, carry: tuple) -> tuple:
        x, state, gstate, diag = carry
        noise = None if keys is None else (lambda j: image_normal(keys, x.shape[1:], i, j))
        post = (lambda y: jnp.asarray(post_step(i, y), jnp.float32)) if post_step is not None else (lambda y: y)
        den = denoiser.at_step(i, gstate)
        x, state = spec.step(Step(i, i - start, sched, den, eta, noise, post), x, state)
        if den.new_state is None:
            raise RuntimeError(f"sampler {spec.name!r} made no model evaluation at a step")
        if diagnostics:
            diag = {k: v.at[i].set(den.diagnostics[k]) for k, v in diag.items()}
        return post(x), state, den.new_state, diag

    diag0 = {k: jnp.full((n_steps, x.shape[0]), jnp.nan, jnp.float32) for k in DIAGNOSTICS} if diagnostics else {}
    carry = (x, spec.init_state(x), method.init_state(x), diag0)
    x, _, _, diag = lax.fori_loop(start, end, body, carry)
    return (x, diag) if diagnostics else x


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, step: IntLike) -> jax.Array:
    """Noise clean latents to the level of ``step`` (traced or not), as the scheduler's ``add_noise`` at
    ``timesteps[step]`` after diffusers' ``set_begin_index``."""
    step = jnp.clip(jnp.asarray(step, jnp.int32), 0, schedule.num_steps)
    signal = jnp.asarray(schedule.signal_scale)[step]
    scale = jnp.asarray(schedule.noise_scale)[step]
    return signal * jnp.asarray(x0, jnp.float32) + scale * jnp.asarray(noise, jnp.float32)


def inpaint_post_step(schedule: Schedule, init_latents: jax.Array, noise: jax.Array, mask: jax.Array
                      ) -> PostStep:
    """diffusers' StableDiffusionInpaintPipeline blend for ordinary (4-channel) UNets.

    After step i, keep the sampled latents where ``mask`` is 1 (the region to repaint) and elsewhere put
    ``init_latents`` noised to the next step's level (clean after the last step). ``mask`` broadcasts
    against the latents (e.g. (B, H, W, 1) for NHWC). For second-order samplers diffusers also blends between
    a step's two evaluations; here the blend follows whole steps.
    """

    def post(i: jax.Array, x: jax.Array) -> jax.Array:
        nxt = i + 1
        known = jnp.where(nxt < schedule.num_steps, add_noise(schedule, init_latents, noise, nxt), init_latents)
        return (1 - mask) * known + mask * x

    return post


# --- where a run starts and stops -----------------------------------------------------------------------


def _concrete(value: object) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def img2img_start_step(num_steps: int, strength: FloatLike) -> IntLike:
    """diffusers' img2img ``t_start``: ``init = min(int(N * strength), N); t_start = max(N - init, 0)``.

    A Python float gives diffusers' int exactly; a traced strength gives an int32 array (computed in float32
    with a relative 1e-6 margin, so strengths like 0.7 whose float32 product falls just below an integer
    still round as in float64).
    """
    if _concrete(strength):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        init = min(int(num_steps * strength), num_steps)
        return max(num_steps - init, 0)
    product = num_steps * jnp.clip(jnp.asarray(strength, jnp.float32), 0.0, 1.0)
    init = jnp.minimum(jnp.floor(product * (1 + 1e-6)), num_steps).astype(jnp.int32)
    return jnp.maximum(num_steps - init, 0)


def _cutoff(schedule: Schedule, fraction: FloatLike, what: str) -> FloatLike:
    """SDXL's ``discrete_timestep_cutoff = int(round(T - fraction * T))``."""
    t_train = schedule.num_train_timesteps
    if _concrete(fraction):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{what} must be a float strictly between 0 and 1, got {fraction}")
        return int(round(t_train - fraction * t_train))
    return jnp.round(t_train - jnp.asarray(fraction, jnp.float32) * t_train)


def _loop_timesteps(schedule: Schedule) -> np.ndarray | jax.Array:
    # PNDM's list repeats t1 (its warm-up step); whole steps are placed on its plain timesteps instead.
    return schedule.timesteps if schedule.sampler == "pndm" else schedule.loop_timesteps


def denoising_end_step(schedule: Schedule, denoising_end: FloatLike) -> IntLike:
    """Steps the SDXL base runs with ``denoising_end`` (StableDiffusionXLPipeline).

    diffusers keeps the timesteps ``>= cutoff``; for second-order samplers (Heun, DPM2, DPM++ SDE), whose
    list interleaves two evaluations per step, it is the whole steps among them, which is also where the
    refiner's ``denoising_start_step`` for the same fraction begins.
    """
    cutoff = _cutoff(schedule, denoising_end, "denoising_end")
    ts = _loop_timesteps(schedule)
    if _concrete(cutoff):
        return int((np.asarray(ts) >= cutoff).sum()) // schedule.order
    return (jnp.asarray(ts) >= cutoff).sum().astype(jnp.int32) // schedule.order


def denoising_start_step(schedule: Schedule, denoising_start: FloatLike) -> IntLike:
    """First step of the SDXL refiner with ``denoising_start`` (StableDiffusionXLImg2ImgPipeline.get_timesteps).

    diffusers counts the timesteps ``< cutoff`` (rounded up to odd for second-order schedulers, so a
    step is never split) and starts the rest from the end of the list.
    """
    cutoff = _cutoff(schedule, denoising_start, "denoising_start")
    ts = _loop_timesteps(schedule)
    xp = np if _concrete(cutoff) else jnp
    count = (xp.asarray(ts) < cutoff).sum()
    if schedule.order == 2:
        count = count + (count % 2 == 0)
    t_start = len(ts) - count
    return int(t_start) // schedule.order if xp is np else (t_start // schedule.order).astype(jnp.int32)
