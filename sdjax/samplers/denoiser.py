"""The one door between a sampler and the model: each evaluation runs the guidance method's passes and
returns the guided prediction.

``passes_fn(x_in, t, passes) -> {pass: raw output}`` is the UNet (or any model): ``x_in`` has the latent's
shape (any layout, batch first), ``t`` is a float32 scalar timestep (integer-valued where diffusers passes
integers), ``passes`` a static tuple of pass names (``"cond"``, ``"uncond"``, ``"empty"``). The sampler hands
the model exactly what diffusers' UNet receives: ``scheduler.scale_model_input(latents, t)`` and the same t.
A plain single-pass ``model_fn(x_in, t) -> output`` is :func:`single_pass` of it. A passes function marked by
:func:`takes_evaluation` is also given ``evaluation=(i, k)``: the loop step ``i`` (traced) and which model
evaluation of that step this is, ``k`` (a Python int: 1 for the second stage of Heun, DPM2, DPM++ SDE, PNDM's
warm-up), for models whose inputs follow diffusers' per-evaluation step counter (ControlNet start/end).

Samplers see a :class:`StepDenoiser` (one per step) with views of the same evaluation:

* ``denoiser(x, sigma, t) -> x0``: k-diffusion form, latent ``x = x0 + sigma * noise``; the model sees
  ``x / sqrt(sigma**2 + 1)`` (c_in).
* ``denoiser.vp(x, alpha, sigma, t) -> (x0, eps)``: variance-preserving form, ``x = alpha * x0 + sigma * eps``;
  the model sees ``x`` as is. Works at alpha = 0 (zero terminal SNR) for v-prediction.
* ``denoiser.output(x, alpha, sigma, t)``: the guided raw output (PNDM combines raw outputs).
* ``denoiser.evaluate_k`` / ``evaluate_vp``: the whole :class:`Evaluation`, for samplers that also use what a
  guidance method returns besides the prediction (CFG++'s re-noising eps, classifier guidance's mean shift).

Guidance state (APG's momentum, ...) rides in the loop carry: the first evaluation of each step updates it;
later evaluations inside the same step (the second stage of Heun, DPM2, DPM++ SDE, PNDM's warm-up) start from
the step's state too and their update is dropped, so every step advances the state exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdjax.guidance.context import COND, Guided, StepContext, diagnostics
from sdjax.guidance.methods import Conditional, Method

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
PassesFn = Callable[[jax.Array, jax.Array, tuple[str, ...]], dict[str, jax.Array]]


def takes_evaluation(passes_fn: Callable) -> Callable:
    """Mark ``passes_fn`` as taking the ``evaluation=(i, k)`` keyword (see the module docstring)."""
    passes_fn.takes_evaluation = True  # type: ignore[attr-defined]
    return passes_fn


def single_pass(model_fn: ModelFn) -> PassesFn:
    """A one-pass model (no guidance) as a passes function."""

    def passes_fn(x: jax.Array, t: jax.Array, passes: tuple[str, ...]) -> dict[str, jax.Array]:
        if passes != (COND,):
            raise ValueError(f"this model has only the conditional pass; the guidance asked for {passes}")
        return {COND: model_fn(x, t)}

    return passes_fn


class Evaluation(NamedTuple):
    x0: jax.Array
    eps: jax.Array
    renoise: jax.Array | None  # eps to re-noise with (CFG++), else None
    mean_shift: jax.Array | None  # s * grad log p in the model's input space (classifier guidance 1), else None


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """The model, its prediction type and the guidance method, for one run of the loop."""

    passes_fn: PassesFn
    prediction_type: str
    method: Method = dataclasses.field(default_factory=Conditional)
    num_steps: int = 1
    num_train_timesteps: int = 1000
    decode: Callable[[jax.Array], jax.Array] | None = None

    def at_step(self, i: jax.Array, state: Any) -> StepDenoiser:
        return StepDenoiser(self, i, state)


class StepDenoiser:
    """The denoiser within one loop step: evaluations see the step index and the guidance state."""

    def __init__(self, denoiser: Denoiser, i: jax.Array, state: Any) -> None:
        self.denoiser = denoiser
        self.prediction_type = denoiser.prediction_type
        self.i = i
        self.state = state
        self.new_state: Any = None  # set by the step's first evaluation
        self.evaluations = 0  # model evaluations traced so far in this step
        self.diagnostics: dict[str, jax.Array] | None = None

    # the one door
    def _guided(self, x_in: jax.Array, alpha: jax.Array, sigma_t: jax.Array, t: jax.Array,
                sigma: jax.Array | None = None) -> Guided:
        d = self.denoiser
        t = jnp.asarray(t, jnp.float32)
        step = {"evaluation": (self.i, self.evaluations)} if getattr(d.passes_fn, "takes_evaluation", False) else {}
        self.evaluations += 1
        ctx = StepContext(x=x_in, alpha=alpha, sigma_t=sigma_t, t=t, step=self.i, num_steps=d.num_steps,
                          prediction_type=d.prediction_type, num_train_timesteps=d.num_train_timesteps,
                          sigma=sigma, decode=d.decode)

        def run(passes: tuple[str, ...], x: jax.Array | None = None) -> dict[str, jax.Array]:
            out = d.passes_fn(x_in if x is None else x, t, tuple(passes), **step)
            return {k: v.astype(jnp.float32) for k, v in out.items()}

        guided, state = d.method.evaluate(run, ctx, self.state)
        if self.new_state is None:
            self.new_state = state
            self.diagnostics = diagnostics(guided, ctx)
        return guided

    # views for the samplers
    def evaluate_k(self, x: jax.Array, sigma: jax.Array, t: jax.Array) -> Evaluation:
        scale = (sigma**2 + 1) ** 0.5
        g = self._guided(x / scale, 1 / scale, sigma / scale, t, sigma)
        out = g.out
        if self.prediction_type == "epsilon":
            x0, eps = x - sigma * out, out
        elif self.prediction_type == "v_prediction":
            # c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
            x0 = out * (-sigma / scale) + x / (sigma**2 + 1)
            eps = (x - x0) / sigma
        else:
            x0, eps = out, (x - out) / sigma
        return Evaluation(x0, eps, g.renoise, g.mean_shift)

    def evaluate_vp(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array, t: jax.Array,
                    k_sigma: jax.Array | None = None) -> Evaluation:
        """``k_sigma``: the schedule's sigma-space level when the sampler has it (exact interval bounds)."""
        g = self._guided(x, alpha, sigma, t, k_sigma)
        x0, eps = output_to_x0_eps(g.out, x, alpha, sigma, self.prediction_type)
        return Evaluation(x0, eps, g.renoise, g.mean_shift)

    def __call__(self, x: jax.Array, sigma: jax.Array, t: jax.Array) -> jax.Array:
        return self.evaluate_k(x, sigma, t).x0

    def vp(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array, t: jax.Array,
           k_sigma: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        ev = self.evaluate_vp(x, alpha, sigma, t, k_sigma)
        return ev.x0, ev.eps

    def output(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array, t: jax.Array,
               k_sigma: jax.Array | None = None) -> jax.Array:
        return self._guided(x, alpha, sigma, t, k_sigma).out


def output_to_x0_eps(out: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                     prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Raw model output at ``x = alpha * x0 + sigma * eps`` -> (x0, eps), with diffusers' formulas."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma
