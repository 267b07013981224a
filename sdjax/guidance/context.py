"""What a guidance method sees at each step, and what it returns.

A model evaluation runs the UNet once per *pass* (``"cond"``: the prompt, ``"uncond"``: the negative prompt
or the empty one, ``"empty"``: always the empty prompt) on the same latent, and a guidance method combines
the passes' raw outputs (epsilon, v or x0, as the model predicts) into one. The step context carries what
the combination may depend on: the latent the UNet saw, the noise level, the timestep and the step, with
conversions between the model's output and eps / x0 / v at that noise level.

Noise levels are given in variance-preserving form, ``x = alpha * x0 + sigma_t * eps`` (``x`` is what the UNet
sees); the k-diffusion sigma is ``sigma_t / alpha``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

SPACES = ("output", "eps", "x0", "v")
COND, UNCOND, EMPTY = "cond", "uncond", "empty"
PASSES = (COND, UNCOND, EMPTY)


def cond_parts(count: int) -> tuple[str, ...]:
    """The pass names of a prompt's ``count`` composable-diffusion (``AND``) parts: ``"cond"``, ``"cond_1"``, ..."""
    return tuple(COND if k == 0 else f"{COND}_{k}" for k in range(count))


def is_cond(name: str) -> bool:
    """Whether a pass is the prompt or one of its ``AND`` parts (they share the prompt's other conditioning)."""
    return name == COND or (name.startswith(f"{COND}_") and name[len(COND) + 1:].isdigit())

Predictions = Mapping[str, jax.Array]
# run(passes, x=None) -> {pass: raw output}: evaluates the UNet on the listed passes (on x, default the
# step's latent). Guidance methods that choose which passes run (intervals) or differentiate through the
# model (universal guidance) call it themselves.
RunPasses = Callable[..., Predictions]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """One model evaluation inside the loop. Arrays are traced; ``num_steps`` and the names are static."""

    x: jax.Array  # what the UNet sees (batch first), before any extra input channels (inpainting)
    alpha: jax.Array
    sigma_t: jax.Array
    t: jax.Array  # the timestep the UNet receives
    step: jax.Array  # schedule index of this step (0 = the noisiest)
    num_steps: int
    prediction_type: str
    num_train_timesteps: int
    sigma: jax.Array | None = None  # the k-diffusion sigma (x / alpha = x0 + sigma * eps), as the sampler has it
    decode: Callable[[jax.Array], jax.Array] | None = None  # scaled latents -> pixels in [0, 1], if available

    def __post_init__(self) -> None:
        if self.sigma is None:
            object.__setattr__(self, "sigma", self.sigma_t / self.alpha)

    @property
    def progress(self) -> jax.Array:
        """1 - t / T: 0 at pure noise, approaching 1 at the end (the schedules' clock)."""
        return 1.0 - jnp.asarray(self.t, jnp.float32) / self.num_train_timesteps

    def replace(self, **changes: Any) -> StepContext:
        return dataclasses.replace(self, **changes)

    # --- conversions at this noise level, holding x fixed --------------------------------------------------

    def to_x0(self, out: jax.Array) -> jax.Array:
        a, s, x = self.alpha, self.sigma_t, self.x
        if self.prediction_type == "epsilon":
            return (x - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x - s * out
        return out

    def to_eps(self, out: jax.Array) -> jax.Array:
        a, s, x = self.alpha, self.sigma_t, self.x
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            return a * out + s * x
        return (x - a * out) / s

    def to_v(self, out: jax.Array) -> jax.Array:
        return self.alpha * self.to_eps(out) - self.sigma_t * self.to_x0(out)

    def from_x0(self, x0: jax.Array) -> jax.Array:
        a, s, x = self.alpha, self.sigma_t, self.x
        if self.prediction_type == "epsilon":
            return (x - a * x0) / s
        if self.prediction_type == "v_prediction":
            return (a * x - x0) / s
        return x0

    def from_eps(self, eps: jax.Array) -> jax.Array:
        a, s, x = self.alpha, self.sigma_t, self.x
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return (eps - s * x) / a
        return (x - s * eps) / a

    def from_v(self, v: jax.Array) -> jax.Array:
        # x0 = alpha x - sigma_t v (since alpha^2 + sigma_t^2 = 1)
        return self.from_x0(self.alpha * self.x - self.sigma_t * v)

    def to_space(self, out: jax.Array, space: str) -> jax.Array:
        return {"output": lambda o: o, "eps": self.to_eps, "x0": self.to_x0, "v": self.to_v}[check_space(space)](out)

    def from_space(self, pred: jax.Array, space: str) -> jax.Array:
        return {"output": lambda p: p, "eps": self.from_eps, "x0": self.from_x0,
                "v": self.from_v}[check_space(space)](pred)


def check_space(space: str) -> str:
    if space not in SPACES:
        raise ValueError(f"unknown prediction space {space!r}; valid: {', '.join(SPACES)}")
    return space


class Guided(NamedTuple):
    """A guidance method's result for one evaluation.

    ``out``: the guided prediction in the model's output space (what the sampler turns into x0).
    ``renoise``: epsilon the sampler re-noises with instead of the guided one (CFG++: the unconditional), or
    None. ``mean_shift``: ``s * grad log p(y | x)`` in the UNet's input space, added to the ancestral mean
    times the posterior variance (classifier guidance, algorithm 1), or None.
    ``cond`` / ``uncond``: the raw conditional / unconditional outputs when they were computed (diagnostics).
    """

    out: jax.Array
    renoise: jax.Array | None = None
    mean_shift: jax.Array | None = None
    cond: jax.Array | None = None
    uncond: jax.Array | None = None


def per_image_sum(x: jax.Array) -> jax.Array:
    """Sum over all non-batch axes, keeping them as size-1 axes (broadcasts against x)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def per_image_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(per_image_sum(x * x))


def diagnostics(guided: Guided, ctx: StepContext) -> dict[str, jax.Array]:
    """Per-image numbers for one evaluation: the guidance term's norm (guided - cond), the cosine between the
    conditional and unconditional outputs, and the latent's standard deviation. NaN where not computed."""
    batch = guided.out.shape[0]
    nan = jnp.full((batch,), jnp.nan, jnp.float32)
    flat = lambda a: a.reshape(batch, -1)  # noqa: E731
    std = jnp.std(flat(ctx.x / ctx.alpha), axis=1)
    if guided.cond is None:
        return {"guidance_norm": nan, "cond_uncond_cosine": nan, "latent_std": std}
    norm = jnp.linalg.norm(flat(guided.out - guided.cond), axis=1)
    if guided.uncond is None:
        return {"guidance_norm": norm, "cond_uncond_cosine": nan, "latent_std": std}
    c, u = flat(guided.cond), flat(guided.uncond)
    cos = jnp.sum(c * u, axis=1) / (jnp.linalg.norm(c, axis=1) * jnp.linalg.norm(u, axis=1) + 1e-12)
    return {"guidance_norm": norm, "cond_uncond_cosine": cos, "latent_std": std}


DIAGNOSTICS = ("guidance_norm", "cond_uncond_cosine", "latent_std")
