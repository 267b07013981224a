"""Timestep-space samplers: the latent is ``x = sqrt(a) * x0 + sqrt(1 - a) * noise`` (a = alpha-bar).

Written in diffusers' own alpha form (clearer than a sigma rewrite, and exact at a = 0 for zero-terminal-SNR
v-prediction models); see ``registry.SAMPLER_INFO``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sdjax.samplers.core import State, Step
from sdjax.samplers.denoiser import output_to_x0_eps


def process_x0(s: Step, x0: jax.Array) -> jax.Array:
    """diffusers' DDIM/DDPM clipping (``clip_sample``) or Imagen's dynamic thresholding (``thresholding``) of
    the x0 estimate; epsilon is not recomputed from it (as diffusers' pipelines call the step)."""
    kind = s.sched.x0_processing
    if kind is None:
        return x0
    if kind[0] == "clip":
        return jnp.clip(x0, -kind[1], kind[1])
    _, ratio, max_value = kind
    flat = x0.reshape(x0.shape[0], -1)
    q = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (jnp.clip(flat, -q, q) / q).reshape(x0.shape)


def _x0_eps(s: Step, x: jax.Array, a: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    return s.denoise.vp(x, a**0.5, (1 - a) ** 0.5, t)


def ddim(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """DDIMScheduler: deterministic for eta = 0, DDPM-like noise for eta = 1. With CFG++ the direction to x_t
    uses the unconditional eps."""
    a, a_prev = s.sched.extra["alphas"][s.i], s.sched.extra["alphas_prev"][s.i]
    ev = s.denoise.evaluate_vp(x, a**0.5, (1 - a) ** 0.5, s.sched.timesteps[s.i], s.sched.sigmas[s.i])
    eps = ev.eps if ev.renoise is None else ev.renoise
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = s.eta * variance**0.5
    x = a_prev**0.5 * process_x0(s, ev.x0) + (1 - a_prev - std**2) ** 0.5 * eps
    if s.noise is not None:
        x = x + std * s.noise(0)
    return x, state


def ddpm(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """DDPMScheduler, "fixed_small" variance: sample the posterior q(x_prev | x, x0). Classifier guidance
    (algorithm 1 of Dhariwal & Nichol) moves the mean by variance * s * grad log p(y | x_t)."""
    a, a_prev = s.sched.extra["alphas"][s.i], s.sched.extra["alphas_prev"][s.i]
    t = s.sched.timesteps[s.i]
    ev = s.denoise.evaluate_vp(x, a**0.5, (1 - a) ** 0.5, t, s.sched.sigmas[s.i])
    beta = 1 - a / a_prev
    mean = a_prev**0.5 * beta / (1 - a) * process_x0(s, ev.x0) + (a / a_prev) ** 0.5 * (1 - a_prev) / (1 - a) * x
    variance = jnp.maximum((1 - a_prev) / (1 - a) * beta, 1e-20)
    if ev.mean_shift is not None:
        mean = mean + variance * ev.mean_shift
    return mean + jnp.where(t > 0, variance**0.5, 0.0) * s.draw(0), state


def pndm_init(x: jax.Array) -> State:
    return jnp.zeros((3, *x.shape), jnp.float32)  # raw model outputs of the last 3 steps, newest first


def _pndm_update(x: jax.Array, a: jax.Array, a_prev: jax.Array, out: jax.Array, prediction_type: str
                 ) -> jax.Array:
    """diffusers' PNDMScheduler._get_prev_sample (formula (9) of the PNDM paper)."""
    _, eps = output_to_x0_eps(out, x, a**0.5, (1 - a) ** 0.5, prediction_type)
    denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


def pndm(s: Step, x: jax.Array, history: State) -> tuple[jax.Array, State]:
    """PNDMScheduler(skip_prk_steps=True): PLMS, Adams-Bashforth (order up to 4) over raw model outputs.

    As diffusers, the history holds raw outputs (epsilon, or v for v-prediction) and a combination is turned
    into epsilon with the current step's alpha. A call's first step (unless it is the last) evaluates the
    model twice, at t_i and at t_{i+1} on the predicted latent, and averages.

    Image-to-image differs from diffusers on purpose: diffusers slices PNDM's N + 1-entry timestep list by
    t_start, which starts one timestep early and then skips one; here a run from step s starts at t_s like
    every other sampler.
    """
    ex, pred = s.sched.extra, s.denoise.prediction_type
    a, a_prev = ex["alphas"][s.i], ex["alphas_prev"][s.i]
    out = s.denoise.output(x, a**0.5, (1 - a) ** 0.5, s.sched.timesteps[s.i])

    def warm_up() -> jax.Array:
        x_pred = _pndm_update(x, a, a_prev, out, pred)
        out_next = s.denoise.output(x_pred, a_prev**0.5, (1 - a_prev) ** 0.5, ex["t_next"][s.i])
        return _pndm_update(x, ex["alphas_2"][s.i], ex["alphas_2_prev"][s.i], (out + out_next) / 2, pred)

    def multistep() -> jax.Array:
        e1, e2, e3 = history
        order = jnp.minimum(s.n + 1, 4)
        combined = jnp.select(
            [order == 1, order == 2, order == 3],
            [out, (3 * out - e1) / 2, (23 * out - 16 * e1 + 5 * e2) / 12],
            (1 / 24) * (55 * out - 59 * e1 + 37 * e2 - 9 * e3),
        )
        return _pndm_update(x, a, a_prev, combined, pred)

    x = lax.cond((s.n == 0) & ~s.is_last, warm_up, multistep)
    return x, jnp.concatenate([out[None], history[:2]])


def lcm(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """LCMScheduler: consistency-model x0 estimate, re-noised to the next timestep (not after the last)."""
    ex = s.sched.extra
    a, a_prev = ex["alphas"][s.i], ex["alphas_prev"][s.i]
    x0, _ = _x0_eps(s, x, a, s.sched.timesteps[s.i])
    denoised = ex["c_out"][s.i] * x0 + ex["c_skip"][s.i] * x
    renoised = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * s.draw(0)
    return jnp.where(s.is_last, denoised, renoised), state
