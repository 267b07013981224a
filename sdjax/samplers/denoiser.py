"""The model behind a denoiser: raw UNet output (epsilon, v or x0) turned into an x0 estimate.

``model_fn(x_in, t) -> model_output`` is the UNet with classifier-free guidance already applied: ``x_in`` has
the latent's shape (any layout, batch first), ``t`` is a float32 scalar timestep (integer-valued where
diffusers passes integers). The sampler hands the model exactly what diffusers' UNet receives:
``scheduler.scale_model_input(latents, t)`` and the same ``t``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """``model_fn`` seen by a sampler. Two forms, as the two families of diffusers schedulers:

    * ``denoiser(x, sigma, t)``: k-diffusion form, latent ``x = x0 + sigma * noise``; the model sees
      ``x / sqrt(sigma**2 + 1)`` (c_in). Returns x0.
    * ``denoiser.vp(x, alpha, sigma, t)``: variance-preserving form, ``x = alpha * x0 + sigma * noise``; the
      model sees ``x`` as is. Returns (x0, epsilon). Works at alpha = 0 (zero terminal SNR) for v-prediction.
    """

    model_fn: ModelFn
    prediction_type: str

    def model(self, x: jax.Array, t: jax.Array) -> jax.Array:
        return self.model_fn(x, jnp.asarray(t, jnp.float32)).astype(jnp.float32)

    def __call__(self, x: jax.Array, sigma: jax.Array, t: jax.Array) -> jax.Array:
        out = self.model(x / (sigma**2 + 1) ** 0.5, t)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            # c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return out

    def vp(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return output_to_x0_eps(self.model(x, t), x, alpha, sigma, self.prediction_type)


def output_to_x0_eps(out: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                     prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Raw model output at ``x = alpha * x0 + sigma * eps`` -> (x0, eps), with diffusers' formulas."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma
