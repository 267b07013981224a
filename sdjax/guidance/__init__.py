"""Guidance on raw model outputs (epsilon / v / x0 as the model predicts them).

Classifier-free guidance runs the UNet once on a batch holding each image's unconditional and conditional
input side by side; these functions combine the two halves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interleave(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """(B, ...) x2 -> (2B, ...) as [u0, c0, u1, c1, ...].

    Pairs stay next to each other, so a batch sharded over devices stays sharded the same way (no data moves
    between devices), unlike diffusers' [all uncond, all cond] concatenation.
    """
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + uncond.shape[1:])


def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`interleave`."""
    pairs = x.reshape((-1, 2) + x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def classifier_free(uncond: jax.Array, cond: jax.Array, scale: jax.Array | float) -> jax.Array:
    return uncond + scale * (cond - uncond)


def rescale(guided: jax.Array, cond: jax.Array, amount: jax.Array | float) -> jax.Array:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4).

    Scales the guided prediction to the per-image standard deviation of the conditional one, then mixes by
    ``amount``. Standard deviations are unbiased, as diffusers' ``rescale_noise_cfg`` computes them.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return amount * rescaled + (1.0 - amount) * guided


def guidance_scale_embedding(w: jax.Array, dim: int) -> jax.Array:
    """LCM's guidance-scale embedding (diffusers ``get_guidance_scale_embedding``), fed as ``timestep_cond``."""
    w = jnp.atleast_1d(w).astype(jnp.float32) * 1000.0
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))
