"""Exponential-integrator multistep samplers (DPM-Solver++, UniPC), in diffusers' variance-preserving form.

The latent is ``alpha_t * x0 + sigma_t * noise`` with ``alpha_t = 1 / sqrt(sigma**2 + 1)`` and
``sigma_t = sigma * alpha_t`` for the schedule's sigma; ``lambda = log(alpha_t / sigma_t)``. A step's
order is chosen with traced selects: unused coefficients are replaced by 0 before they touch arrays, so an
infinite step size at sigma = 0 never turns into NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.samplers.core import State, Step
from sdjax.samplers.denoiser import Evaluation


def _alpha_sigma_lambda(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


def _evaluate(s: Step, x: jax.Array) -> tuple[Evaluation, jax.Array, jax.Array, jax.Array]:
    """(the model's evaluation, alpha_s, sigma_s, lambda_s) at the current step."""
    sigma = s.sched.sigmas[s.i]
    alpha_s, sigma_s, lambda_s = _alpha_sigma_lambda(sigma)
    return s.denoise.evaluate_vp(x, alpha_s, sigma_s, s.sched.timesteps[s.i], sigma), alpha_s, sigma_s, lambda_s


def _x0(s: Step, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(x0, alpha_s, sigma_s, lambda_s) at the current step."""
    ev, alpha_s, sigma_s, lambda_s = _evaluate(s, x)
    return ev.x0, alpha_s, sigma_s, lambda_s


def _second_order_scale(s: Step, h: jax.Array, lambda_s: jax.Array) -> jax.Array:
    """1 / r0 for the D1 = (m0 - m1) / r0 term, or 0 when this step is first order."""
    _, _, lambda_prev = _alpha_sigma_lambda(s.sched.sigmas[jnp.maximum(s.i - 1, 0)])
    second = (s.n > 0) & ~(s.is_last & s.sched.final_first_order)
    return jnp.where(second, h / (lambda_s - lambda_prev), 0.0)


def dpmpp_2m(s: Step, x: jax.Array, m_prev: State) -> tuple[jax.Array, State]:
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint").
    With CFG++ (the guidance re-noises with the unconditional eps): ComfyUI's sample_dpmpp_2m_cfg_pp."""
    ev, alpha_s, sigma_s, lambda_s = _evaluate(s, x)
    m0 = ev.x0
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(s.sched.sigmas[s.i + 1])
    h = lambda_t - lambda_s
    if ev.renoise is not None:
        return _dpmpp_2m_cfg_pp(s, x, ev, alpha_s, sigma_s, lambda_s, m_prev)
    d1 = _second_order_scale(s, h, lambda_s) * (m0 - m_prev)
    x = sigma_t / sigma_s * x - alpha_t * (jnp.exp(-h) - 1.0) * m0 - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    return x, m0


def _dpmpp_2m_cfg_pp(s: Step, x: jax.Array, ev: Evaluation, alpha_s: jax.Array, sigma_s: jax.Array,
                     lambda_s: jax.Array, u_prev: State) -> tuple[jax.Array, State]:
    """DPM++ 2M with CFG++ in k-diffusion form (x_k = x / alpha): ``x_k' = D + mix + exp(-h) x_k`` where
    ``mix = -exp(-h) U - expm1(-h) / (2 r) (D - U_prev)`` (first order: ``-exp(-h) U``); D is the guided x0,
    U the unconditional one, and the history holds U."""
    u0 = (x - sigma_s * ev.renoise) / alpha_s
    alpha_t, _, lambda_t = _alpha_sigma_lambda(s.sched.sigmas[s.i + 1])
    h = lambda_t - lambda_s
    inv_r = _second_order_scale(s, h, lambda_s)  # h / h_last, or 0 on a first-order step
    mix = -jnp.exp(-h) * u0 - jnp.expm1(-h) * 0.5 * inv_r * (ev.x0 - u_prev)
    return alpha_t * (ev.x0 + mix + jnp.exp(-h) * (x / alpha_s)), u0


def dpmpp_2m_sde(s: Step, x: jax.Array, m_prev: State) -> tuple[jax.Array, State]:
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2) at eta = 1 (default);
    other eta as k-diffusion's sample_dpmpp_2m_sde (eta = 0 is DPM++ 2M)."""
    m0, _, sigma_s, lambda_s = _x0(s, x)
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(s.sched.sigmas[s.i + 1])
    h = lambda_t - lambda_s
    eta_h = jnp.where(s.eta == 0, 0.0, s.eta * h)  # avoid 0 * inf at the final sigma
    d1 = _second_order_scale(s, h, lambda_s) * (m0 - m_prev)
    decay = 1.0 - jnp.exp(-h - eta_h)
    x = (sigma_t / sigma_s * jnp.exp(-eta_h) * x + alpha_t * decay * m0 + 0.5 * (alpha_t * decay) * d1
         + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2.0 * eta_h)) * s.draw(0))
    return x, m0


def unipc_init(x: jax.Array) -> State:
    zeros = jnp.zeros_like(x, jnp.float32)
    # x0 estimates of the last two steps, the latent before the last predictor, that predictor's order
    return zeros, zeros, zeros, jnp.zeros((), jnp.int32)


def _bh2_coefficients(h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """UniPC's B(h) = expm1(-h) ("bh2") and the b vector of its order-2 linear system (predict_x0=True)."""
    hh = -h
    b_h = jnp.expm1(hh)
    phi_k = b_h / hh - 1
    b1 = phi_k / b_h
    b2 = (phi_k / hh - 0.5) * 2 / b_h
    return b_h, b1, b2


def _corrector(s: Step, x_last: jax.Array, x: jax.Array, m_t: jax.Array, m1: jax.Array, m2: jax.Array,
               order: jax.Array) -> jax.Array:
    """UniC: redo the step from x_last (at i-1) to i with the new x0 estimate m_t."""
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(s.sched.sigmas[s.i])
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(s.sched.sigmas[s.i - 1])
    _, _, lambda_s1 = _alpha_sigma_lambda(s.sched.sigmas[s.i - 2])
    h = lambda_t - lambda_s0
    b_h, b1, b2 = _bh2_coefficients(h)
    rk = (lambda_s1 - lambda_s0) / h
    rho0 = (b1 - b2) / (1 - rk)  # solve [[1, 1], [rk, 1]] @ rho = [b1, b2]
    two = order == 2
    c_hist = jnp.where(two, rho0 / rk, 0.0)
    c_new = jnp.where(two, b1 - rho0, 0.5)
    correction = c_hist * (m2 - m1) + c_new * (m_t - m1)
    return sigma_t / sigma_s0 * x_last - alpha_t * b_h * m1 - alpha_t * b_h * correction


def unipc(s: Step, x: jax.Array, state: State) -> tuple[jax.Array, State]:
    """UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True): UniC corrector on the
    model's new estimate, then UniP predictor; the corrector costs no extra model evaluation."""
    m1, m2, x_last, last_order = state
    m0, _, sigma_s, lambda_s = _x0(s, x)
    x = jnp.where(s.n > 0, _corrector(s, x_last, x, m0, m1, m2, last_order), x)

    order = jnp.minimum(jnp.minimum(2, s.sched.num_steps - s.i), s.n + 1).astype(jnp.int32)
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(s.sched.sigmas[s.i + 1])
    _, _, lambda_prev = _alpha_sigma_lambda(s.sched.sigmas[jnp.maximum(s.i - 1, 0)])
    h = lambda_t - lambda_s
    b_h = jnp.expm1(-h)
    c_hist = jnp.where(order == 2, 0.5 * h / (lambda_prev - lambda_s), 0.0)  # rho_p = 1/2 on D1 = (m1 - m0) / rk
    x_next = sigma_t / sigma_s * x - alpha_t * b_h * m0 - alpha_t * b_h * c_hist * (m1 - m0)
    return x_next, (m0, m1, x, order)
