"""Guidance: how each step combines the model's passes (classifier-free and its research variants,
classifier guidance through ``jax.grad``), as pure functions called inside the sampler loop.

    from sdjax import guidance
    pipe.text_to_image(prompt, guidance=guidance.CFG(7.5, rescale=0.7))
    pipe.text_to_image(prompt, guidance=guidance.Interval(guidance.CFG(10.0), sigma_min=0.3, sigma_max=5.0))
    pipe.text_to_image(prompt, guidance=guidance.CFG(guidance.Linear(7.5)))
    pipe.text_to_image(prompt, guidance_scale=[3.0, 5.0, 7.5])     # a sweep: (3, B, H, W, 3), same noise

See :mod:`sdjax.guidance.methods` for the methods and :mod:`sdjax.guidance.context` for the step context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.guidance.context import COND, EMPTY, PASSES, UNCOND, Guided, StepContext, cond_parts, is_cond
from sdjax.guidance.methods import (
    APG,
    CFG,
    TCFG,
    CFGPlusPlus,
    CFGZeroStar,
    ClampLinear,
    ClassifierGuidance,
    Composable,
    Conditional,
    Cosine,
    DynamicThresholding,
    Interval,
    Linear,
    Method,
    NegativeMinSigma,
    PerpNeg,
    PerStep,
    apg_combine,
    as_arrays,
    composable_passes,
    rescale,
    sweep_axes,
    sweep_size,
)

__all__ = [
    "APG", "CFG", "COND", "EMPTY", "PASSES", "TCFG", "UNCOND", "CFGPlusPlus", "CFGZeroStar", "ClampLinear",
    "ClassifierGuidance", "Composable", "Conditional", "Cosine", "DynamicThresholding", "Guided", "Interval",
    "Linear", "Method", "NegativeMinSigma", "PerStep", "PerpNeg", "StepContext", "apg_combine", "as_arrays",
    "composable_passes", "cond_parts", "guidance_scale_embedding", "is_cond", "rescale", "stack_passes",
    "sweep_axes", "sweep_size", "unstack_passes",
]


def stack_passes(parts: list[jax.Array]) -> jax.Array:
    """P arrays (B, ...) -> (B * P, ...) as [p0_0, p1_0, ..., p0_1, p1_1, ...]: an image's passes side by side.

    Passes stay next to each other, so a batch sharded over devices stays sharded the same way (no data moves
    between devices), unlike diffusers' [all uncond, all cond] concatenation.
    """
    if len(parts) == 1:
        return parts[0]
    return jnp.stack(parts, axis=1).reshape((-1,) + parts[0].shape[1:])


def unstack_passes(x: jax.Array, count: int) -> list[jax.Array]:
    """Inverse of :func:`stack_passes`."""
    if count == 1:
        return [x]
    grouped = x.reshape((-1, count) + x.shape[1:])
    return [grouped[:, k] for k in range(count)]


def guidance_scale_embedding(w: jax.Array, dim: int) -> jax.Array:
    """LCM's guidance-scale embedding (diffusers ``get_guidance_scale_embedding``), fed as ``timestep_cond``."""
    w = jnp.atleast_1d(w).astype(jnp.float32) * 1000.0
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))
