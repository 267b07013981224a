"""Sigma-space samplers (k-diffusion style): the latent is ``x = x0 + sigma * noise``.

Each reproduces a diffusers scheduler step for step; see ``registry.SAMPLER_INFO``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sdjax.samplers.core import State, Step


def _sigmas(s: Step) -> tuple[jax.Array, jax.Array]:
    return s.sched.sigmas[s.i], s.sched.sigmas[s.i + 1]


def to_d(x: jax.Array, sigma: jax.Array, x0: jax.Array) -> jax.Array:
    """The probability-flow ODE's derivative dx/dsigma at x (k-diffusion's ``to_d``)."""
    return (x - x0) / sigma


def euler(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """EulerDiscreteScheduler: one Euler step of the probability-flow ODE. CFG++: x0 + sigma_next * eps_uncond
    (ComfyUI's sample_euler_cfg_pp)."""
    sigma, sigma_next = _sigmas(s)
    ev = s.denoise.evaluate_k(x, sigma, s.sched.timesteps[s.i])
    if ev.renoise is not None:
        return ev.x0 + sigma_next * ev.renoise, state
    return x + to_d(x, sigma, ev.x0) * (sigma_next - sigma), state


def ancestral_sigmas(sigma: jax.Array, sigma_next: jax.Array, eta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split the step to sigma_next into a deterministic part (down) and fresh noise (up), as k-diffusion."""
    up = jnp.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def euler_a(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """EulerAncestralDiscreteScheduler (eta = 1): Euler to sigma_down, then noise of std sigma_up."""
    sigma, sigma_next = _sigmas(s)
    ev = s.denoise.evaluate_k(x, sigma, s.sched.timesteps[s.i])
    down, up = ancestral_sigmas(sigma, sigma_next, s.eta)
    if ev.renoise is not None:  # CFG++ (ComfyUI's sample_euler_ancestral_cfg_pp)
        return ev.x0 + ev.renoise * down + s.draw(0) * up, state
    return x + to_d(x, sigma, ev.x0) * (down - sigma) + s.draw(0) * up, state


def heun(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """HeunDiscreteScheduler: Euler predictor, trapezoidal corrector (skipped on the last step, to sigma 0)."""
    sigma, sigma_next = _sigmas(s)
    d = to_d(x, sigma, s.denoise(x, sigma, s.sched.timesteps[s.i]))
    dt = sigma_next - sigma
    x_euler = x + d * dt

    def correct() -> jax.Array:
        x_pred = s.post(x_euler)
        d2 = to_d(x_pred, sigma_next, s.denoise(x_pred, sigma_next, s.sched.extra["t_next"][s.i]))
        return x + (d + d2) / 2 * dt

    return lax.cond(s.is_last, lambda: x_euler, correct), state


def dpm2(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """KDPM2DiscreteScheduler: midpoint method with the midpoint at the log-mean sigma."""
    sigma, sigma_next = _sigmas(s)
    d = to_d(x, sigma, s.denoise(x, sigma, s.sched.timesteps[s.i]))

    def midpoint() -> jax.Array:
        sigma_mid = s.sched.extra["sigma_mid"][s.i]
        x_mid = s.post(x + d * (sigma_mid - sigma))
        d_mid = to_d(x_mid, sigma_mid, s.denoise(x_mid, sigma_mid, s.sched.extra["t_mid"][s.i]))
        return x + d_mid * (sigma_next - sigma)

    return lax.cond(s.is_last, lambda: x + d * (sigma_next - sigma), midpoint), state


def lms_init(x: jax.Array) -> State:
    return jnp.zeros((3, *x.shape), jnp.float32)  # derivatives of the last 3 steps, newest first


def lms(s: Step, x: jax.Array, history: State) -> tuple[jax.Array, State]:
    """LMSDiscreteScheduler: linear multistep (order up to 4) over the ODE derivative.

    Coefficients come from the absolute step index, as diffusers' do; derivatives from before this call's
    first step are zeros, which is what diffusers' shorter derivative list amounts to after set_begin_index.
    """
    sigma = s.sched.sigmas[s.i]
    d = to_d(x, sigma, s.denoise(x, sigma, s.sched.timesteps[s.i]))
    c = s.sched.extra["lms_coeffs"][s.i]
    x = x + c[0] * d + c[1] * history[0] + c[2] * history[1] + c[3] * history[2]
    return x, jnp.concatenate([d[None], history[:2]])


def _exp_ancestral(x: jax.Array, x0: jax.Array, sigma: jax.Array, sigma_to: jax.Array, eta: jax.Array,
                   noise: jax.Array) -> jax.Array:
    """DPM-Solver++ first-order step from sigma towards sigma_to, with ancestral noise (k-diffusion)."""
    down, up = ancestral_sigmas(sigma, sigma_to, eta)
    return down / sigma * x - jnp.expm1(jnp.log(down) - jnp.log(sigma)) * x0 + noise * up


def dpmpp_sde(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """DPMSolverSDEScheduler (k-diffusion's DPM++ SDE, r = 1/2, eta = 1 by default).

    diffusers draws the noise from a Brownian tree over sigma; here the two increments of a step, over
    [sigma_mid, sigma] and [sigma_next, sigma], are drawn with the same joint law (the second contains the
    first), from the image's key and the step index, so the results match diffusers in distribution only.
    """
    sigma, sigma_next = _sigmas(s)
    x0 = s.denoise(x, sigma, s.sched.timesteps[s.i])

    def two_stage() -> jax.Array:
        t, t_next = -jnp.log(sigma), -jnp.log(sigma_next)
        sigma_mid = jnp.exp(-(t + (t_next - t) * 0.5))
        z1, z2 = s.draw(0), s.draw(1)
        d1, d2 = sigma - sigma_mid, sigma - sigma_next
        n2 = (d1**0.5 * z1 + (d2 - d1) ** 0.5 * z2) / d2**0.5
        x_mid = s.post(_exp_ancestral(x, x0, sigma, sigma_mid, s.eta, z1))
        x0_mid = s.denoise(x_mid, sigma_mid, s.sched.extra["t_mid"][s.i])
        return _exp_ancestral(x, x0_mid, sigma, sigma_next, s.eta, n2)

    return lax.cond(s.is_last, lambda: x + to_d(x, sigma, x0) * (sigma_next - sigma), two_stage), state
