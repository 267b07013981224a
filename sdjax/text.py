"""Prompt encoding for SD 1.x / 2.x (one encoder) and SDXL (two encoders, pooled embedding).

CLIP skip follows diffusers: ``clip_skip=k`` uses the hidden state k layers before the last. SD1/SD2 pass it
through the final layer norm (``clip_skip=1`` is A1111's "Clip skip: 2"); SDXL always uses un-normed hidden
states and counts from its default, the penultimate layer. Unlike diffusers, the negative (or empty) prompt
gets the same CLIP skip as the prompt, as in A1111: both halves of classifier-free guidance then come from
the same layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.embeddings import expand_tokens
from sdjax.tokenizer import tokenize


def token_ids(pipe: Any, prompts: Sequence[str], encoder: str) -> np.ndarray:
    """Tokenize for one encoder, warning when a prompt is cut at 77 tokens."""
    tokenizer = pipe.text_encoders[encoder].tokenizer
    # Multi-vector textual-inversion tokens stand for several tokens each ("tok" -> "tok tok_1 tok_2").
    ids, cut = tokenize(tokenizer, [expand_tokens(tokenizer, p) for p in prompts])
    for prompt, n in zip(prompts, cut, strict=True):
        if n:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warnings.warn(f"prompt {short!r} is {n} tokens longer than the 77-token limit; the last {n} were cut",
                          stacklevel=4)
    return ids


def _final_norm(module: Any, params: Mapping[str, Any], hidden: jax.Array) -> jax.Array:
    norm = nn.LayerNorm(epsilon=module.config.layer_norm_eps, use_fast_variance=False, dtype=module.dtype)
    return norm.apply({"params": params["final_layer_norm"]}, hidden)


def encode_modules(
    is_sdxl: bool,
    encoders: Sequence[tuple[str, Any]],
    params: Mapping[str, Any],
    ids: Mapping[str, jax.Array],
    clip_skip: int | None,
) -> tuple[jax.Array, jax.Array | None]:
    """(context (B, 77, D), pooled (B, P) or None) from token ids per encoder. Traceable under jit.

    ``encoders`` are (name, CLIPTextModel) pairs; ``params`` and ``ids`` are keyed by the same names.
    """
    if not is_sdxl:
        (name, module), = encoders
        out = module.apply({"params": params[name]}, ids[name])
        if not clip_skip:
            return out.last_hidden_state, None
        return _final_norm(module, params[name], out.hidden_states[-(clip_skip + 1)]), None
    contexts, pooled = [], None
    for name, module in encoders:
        out = module.apply({"params": params[name]}, ids[name])
        contexts.append(out.hidden_states[-((clip_skip or 0) + 2)])
        if out.text_embeds is not None:
            pooled = out.text_embeds
    if pooled is None:
        raise ValueError("an SDXL model needs a text encoder with a projection (text_encoder_2)")
    return jnp.concatenate(contexts, axis=-1), pooled
