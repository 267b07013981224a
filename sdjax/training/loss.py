"""The denoising training objective: noise a latent at a random timestep, predict epsilon / v / x0, MSE.

Randomness comes from one key, split the same way every call (timesteps, noise, offset noise), so a test or a
resumed run can re-derive exactly the noise and timesteps a step used (:func:`loss_randomness`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdjax.samplers.schedules import SchedulerConfig, alphas_cumprod


def loss_randomness(
    key: jax.Array, latents_shape: tuple[int, ...], num_train_timesteps: int, offset_noise: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(timesteps (B,) int32 in [0, num_train_timesteps), noise like the latents) that ``diffusion_loss`` draws
    from ``key``. Offset noise adds ``offset_noise * N(0, 1)`` per image and channel (shape (B, 1, 1, C)): a shift
    of the whole channel that plain noise almost never has, so the model learns to change mean brightness."""
    batch, channels = latents_shape[0], latents_shape[-1]
    t_key, noise_key, offset_key = jax.random.split(key, 3)
    timesteps = jax.random.randint(t_key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, latents_shape, jnp.float32)
    if offset_noise:
        noise = noise + offset_noise * jax.random.normal(offset_key, (batch, 1, 1, channels), jnp.float32)
    return timesteps, noise


def min_snr_weights(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE on the given prediction type.

    The paper weights the x0-space loss by min(SNR, gamma); an epsilon loss is already x0-loss * SNR and a v loss
    x0-loss * (SNR + 1), hence the divisions. At SNR = 0 (zero-terminal-SNR schedules) the epsilon weight's
    limit is 1.
    """
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped  # "sample": the loss is already in x0 space


def diffusion_loss(
    unet: Any,
    unet_params: Any,
    latents: jax.Array,
    context: jax.Array,
    key: jax.Array,
    scheduler: SchedulerConfig,
    *,
    added_cond: dict[str, jax.Array] | None = None,
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the batch of the per-image MSE between the UNet's output and its target.

    ``latents``: scaled VAE latents (B, h, w, C) NHWC (the x0 of diffusion); ``context``: text encoder states
    (B, L, D); ``added_cond``: extra UNet keyword inputs (SDXL ``text_embeds`` / ``time_ids``). The target
    follows ``scheduler.prediction_type``: epsilon = noise, v = sqrt(a) * noise - sqrt(1 - a) * x0, sample = x0.
    Returns (loss, metrics) with metrics ``loss`` (weighted), ``mse`` (unweighted) and ``timestep`` (mean).
    """
    latents = latents.astype(jnp.float32)
    ac = jnp.asarray(alphas_cumprod(scheduler), jnp.float32)
    timesteps, noise = loss_randomness(key, latents.shape, scheduler.num_train_timesteps, offset_noise)
    a = ac[timesteps][:, None, None, None]
    noisy = jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise
    prediction = unet.apply({"params": unet_params}, noisy, timesteps, context, **(added_cond or {}))
    kind = scheduler.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * latents
    else:
        target = latents
    mse = jnp.mean((prediction.astype(jnp.float32) - target) ** 2, axis=(1, 2, 3))
    weights = jnp.ones_like(mse)
    if min_snr_gamma is not None:
        alpha = ac[timesteps]
        weights = min_snr_weights(alpha / (1.0 - alpha), min_snr_gamma, kind)
    loss = jnp.mean(weights * mse)
    return loss, {"loss": loss, "mse": jnp.mean(mse), "timestep": jnp.mean(timesteps.astype(jnp.float32))}
