"""Prompt encoding for SD 1.x / 2.x (one encoder) and SDXL (two encoders, pooled embedding).

Prompts are read as AUTOMATIC1111 reads them (:func:`sdjax.tokenizer.prompt_chunks`): emphasis weights, any
length in chunks of 77 tokens, ``BREAK``. Each chunk is encoded separately and the chunks are concatenated along
the sequence axis, so a request's context is (B, n * 77, D), with n (the chunk count) a compile-time shape: the
host pads every prompt of a request, negatives included, to the same n (:func:`pad_to_chunks`,
:func:`equal_chunks`). SDXL's pooled embedding comes from the first chunk.

Emphasis (``emphasis=`` of :func:`encode_modules`): ``"original"`` (A1111's default) multiplies each token's
hidden state by its weight, then rescales the chunk so its mean is what it was; ``"no_norm"`` only multiplies;
``"none"`` (tokenizer side) reads brackets as text.

CLIP skip follows diffusers: ``clip_skip=k`` uses the hidden state k layers before the last. SD1/SD2 pass it
through the final layer norm (``clip_skip=1`` is A1111's "Clip skip: 2"); SDXL always uses un-normed hidden
states and counts from its default, the penultimate layer. Unlike diffusers, the negative (or empty) prompt
gets the same CLIP skip as the prompt, as in A1111: both halves of classifier-free guidance then come from
the same layer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.embeddings import embedding_token_groups
from sdjax.tokenizer import MAX_LENGTH, empty_chunk, prompt_chunks

EMPHASIS_MODES = ("original", "no_norm", "none")


class Tokens(NamedTuple):
    """A batch of tokenized prompts for one encoder: ``ids`` (B, n*77) int32 and per-token emphasis ``weights``
    (B, n*77) float32, n chunks of 77. A pytree: pass it into jitted code as it is."""

    ids: Any
    weights: Any

    @property
    def chunks(self) -> int:
        return self.ids.shape[-1] // MAX_LENGTH


def check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"unknown emphasis {emphasis!r}; choose one of: {', '.join(EMPHASIS_MODES)}")


def token_ids(pipe: Any, prompts: Sequence[str], encoder: str, *, emphasis: str = "original") -> Tokens:
    """Tokenize ``prompts`` for one encoder; all get the chunk count of the longest (pad further with
    :func:`pad_to_chunks`). Multi-vector textual-inversion tokens expand to all their vectors."""
    check_emphasis(emphasis)
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    tokenizer = pipe.text_encoders[encoder].tokenizer
    groups = embedding_token_groups(tokenizer)
    per_prompt = [prompt_chunks(tokenizer, p, emphasis=emphasis != "none", groups=groups) for p in prompts]
    n = max((ids.shape[0] for ids, _ in per_prompt), default=1)
    padded = [_pad_prompt(ids, w, n, tokenizer) for ids, w in per_prompt]
    if not padded:
        return Tokens(np.zeros((0, n * MAX_LENGTH), np.int32), np.ones((0, n * MAX_LENGTH), np.float32))
    return Tokens(np.stack([ids for ids, _ in padded]), np.stack([w for _, w in padded]))


def _pad_prompt(ids: np.ndarray, weights: np.ndarray, n: int, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    extra = n - ids.shape[0]
    ids = np.concatenate([ids, np.tile(empty_chunk(tokenizer), (extra, 1))]) if extra else ids
    weights = np.concatenate([weights, np.ones((extra, MAX_LENGTH), np.float32)]) if extra else weights
    return ids.reshape(-1), weights.reshape(-1)


def pad_to_chunks(tokens: Tokens, n: int, tokenizer: Any) -> Tokens:
    """``tokens`` with empty chunks appended up to ``n`` chunks (A1111 pads a shorter prompt, or the negative, with
    the encoding of an empty chunk). ``tokenizer``: the encoder's, for its start/end/padding ids."""
    have = tokens.chunks
    if n < have:
        raise ValueError(f"cannot pad {have} chunks to {n}")
    if n == have:
        return tokens
    batch = tokens.ids.shape[0]
    fill = np.tile(empty_chunk(tokenizer), (batch, n - have))
    return Tokens(np.concatenate([np.asarray(tokens.ids), fill], axis=1),
                  np.concatenate([np.asarray(tokens.weights), np.ones(fill.shape, np.float32)], axis=1))


def equal_chunks(pipe: Any, *requests: Mapping[str, Tokens] | None) -> list[dict[str, Tokens] | None]:
    """Pad ``{encoder: Tokens}`` dicts (e.g. cond and uncond of one request; None passes through) to one chunk
    count, the largest among them and their encoders: the UNet's context then has one sequence length."""
    n = max((t.chunks for r in requests if r for t in r.values()), default=1)
    return [None if r is None else {name: pad_to_chunks(t, n, pipe.text_encoders[name].tokenizer)
                                    for name, t in r.items()}
            for r in requests]


def prompt_tokens(pipe: Any, prompts: Sequence[str], prompts_2: Sequence[str] | None = None, *,
                  emphasis: str = "original") -> dict[str, Tokens]:
    """``{encoder: Tokens}`` for every text encoder (SDXL's second gets ``prompts_2`` when given), not yet padded
    to a common chunk count: see :func:`equal_chunks`."""
    return {name: token_ids(pipe, prompts_2 if (name == "text_encoder_2" and prompts_2) else prompts, name,
                            emphasis=emphasis)
            for name in pipe.text_encoders}


def _final_norm(module: Any, params: Mapping[str, Any], hidden: jax.Array) -> jax.Array:
    norm = nn.LayerNorm(epsilon=module.config.layer_norm_eps, use_fast_variance=False, dtype=module.dtype)
    return norm.apply({"params": params["final_layer_norm"]}, hidden)


def apply_emphasis(z: jax.Array, weights: jax.Array, emphasis: str) -> jax.Array:
    """A1111's emphasis on one chunk's hidden states z (B, 77, D) with per-token weights (B, 77).

    "original": ``z * w``, then scaled back to the original mean (over the chunk); a chunk whose weights are all 1
    is returned exactly as it was. "no_norm": ``z * w``. "none": z.
    """
    if emphasis == "none":
        return z
    w = weights.astype(z.dtype)[..., None]
    weighted = z * w
    if emphasis == "no_norm":
        return weighted
    if emphasis != "original":
        raise ValueError(f"unknown emphasis {emphasis!r}; choose one of: {', '.join(EMPHASIS_MODES)}")
    original_mean = jnp.mean(z, axis=(1, 2), keepdims=True)
    new_mean = jnp.mean(weighted, axis=(1, 2), keepdims=True)
    restored = weighted * (original_mean / new_mean)
    plain = jnp.all(weights == 1, axis=1)[:, None, None]
    return jnp.where(plain, z, restored)


def _as_tokens(value: Any) -> Tokens:
    return value if isinstance(value, Tokens) else Tokens(value, None)


def encode_modules(
    is_sdxl: bool,
    encoders: Sequence[tuple[str, Any]],
    params: Mapping[str, Any],
    ids: Mapping[str, Tokens | jax.Array],
    clip_skip: int | None,
    emphasis: str = "original",
) -> tuple[jax.Array, jax.Array | None]:
    """(context (B, n*77, D), pooled (B, P) or None) from :class:`Tokens` (or bare ids) per encoder. Traceable.

    ``encoders`` are (name, CLIPTextModel) pairs; ``params`` and ``ids`` are keyed by the same names; every
    encoder's tokens must have the same chunk count n. Each chunk is encoded on its own (CLIP skip per chunk),
    emphasis is applied per chunk, chunks are concatenated; SDXL's pooled embedding is the first chunk's.
    """
    contexts, pooled = [], None
    for name, module in encoders:
        weighted = isinstance(ids[name], Tokens)
        tokens = _as_tokens(ids[name])
        batch, length = tokens.ids.shape
        if length % MAX_LENGTH:
            raise ValueError(f"{name}: token ids have length {length}, not a multiple of {MAX_LENGTH}")
        n = length // MAX_LENGTH
        chunk_ids = tokens.ids.reshape(batch * n, MAX_LENGTH)
        out = module.apply({"params": params[name]}, chunk_ids)
        if not is_sdxl:
            z = out.last_hidden_state if not clip_skip else _final_norm(
                module, params[name], out.hidden_states[-(clip_skip + 1)])
        else:
            z = out.hidden_states[-((clip_skip or 0) + 2)]
            if out.text_embeds is not None:
                pooled = out.text_embeds.reshape(batch, n, -1)[:, 0]
        if weighted:  # bare ids (training batches) have no weights
            z = apply_emphasis(z, tokens.weights.reshape(batch * n, MAX_LENGTH), emphasis)
        contexts.append(z.reshape(batch, n * MAX_LENGTH, z.shape[-1]))
    if not is_sdxl:
        return contexts[0], None
    if pooled is None:
        raise ValueError("an SDXL model needs a text encoder with a projection (text_encoder_2)")
    if len({c.shape[1] for c in contexts}) != 1:
        raise ValueError(f"the text encoders' tokens have different chunk counts ({[c.shape[1] for c in contexts]} "
                         "tokens); pad them with equal_chunks")
    return jnp.concatenate(contexts, axis=-1), pooled


# --- encode_prompt: conditioning out, in diffusers' layout ---------------------------------------------------------


class PromptEmbeds(NamedTuple):
    """What diffusers' ``encode_prompt`` returns, as float32 numpy arrays: ``prompt_embeds`` (B, S, D),
    ``negative_prompt_embeds`` (B, S, D), for SDXL ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds``
    (B, P) (None otherwise). S = 77 x the request's chunk count. ``**embeds._asdict()`` passes them on."""

    prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None


@functools.lru_cache(maxsize=16)
def _encoder(is_sdxl: bool, encoders: tuple[tuple[str, Any], ...], clip_skip: int | None, emphasis: str):
    return jax.jit(functools.partial(encode_modules, is_sdxl, encoders, clip_skip=clip_skip, emphasis=emphasis))


def check_clip_skip(pipe: Any, clip_skip: int | None) -> None:
    if clip_skip is not None:
        layers = min(enc.config.num_hidden_layers for enc in pipe.text_encoders.values())
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < layers - 1:
            raise ValueError(f"clip_skip={clip_skip!r}: must be an integer from 0 to {layers - 2} for this model")


def _prompt_list(value: str | Sequence[str] | None, n: int | None, name: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a string or a list of strings")
    if n is not None and len(values) == 1 and n > 1:
        values = values * n
    if n is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the batch has {n} prompts")
    return values


def encode_prompt(
    pipe: Any,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    *,
    num_images_per_prompt: int = 1,
    emphasis: str = "original",
) -> PromptEmbeds:
    """Prompt embeddings as diffusers' ``pipe.encode_prompt`` returns them (see :class:`PromptEmbeds`), read with
    A1111's syntax. The negative prompt defaults to "" (SDXL models with ``force_zeros_for_empty_prompt``: zeros)
    and gets the same ``clip_skip`` as the prompt (diffusers gives it none). Prompt and negative have one length."""
    prompts = _prompt_list(prompt, None, "prompt")
    if not prompts:
        raise ValueError("prompt is empty: give a string or a non-empty list of strings")
    batch = len(prompts)
    negatives = _prompt_list(negative_prompt, batch, "negative_prompt")
    prompts_2 = _prompt_list(prompt_2, batch, "prompt_2")
    negatives_2 = _prompt_list(negative_prompt_2, batch, "negative_prompt_2")
    if not pipe.is_sdxl and (prompts_2 or negatives_2):
        raise TypeError("prompt_2, negative_prompt_2: SDXL-only options, but this is not an SDXL model")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    check_clip_skip(pipe, clip_skip)
    check_emphasis(emphasis)

    # As diffusers: only a missing negative_prompt (negative_prompt_2 aside) means zeros.
    zero_uncond = pipe.is_sdxl and negatives is None and pipe.force_zeros_for_empty_prompt
    cond = prompt_tokens(pipe, prompts, prompts_2, emphasis=emphasis)
    uncond = None
    if not zero_uncond:
        negatives = negatives or [""] * batch
        uncond = prompt_tokens(pipe, negatives, negatives_2, emphasis=emphasis)
    cond, uncond = equal_chunks(pipe, cond, uncond)
    encoders = tuple((name, enc.module) for name, enc in pipe.text_encoders.items())
    encode = _encoder(pipe.is_sdxl, encoders, clip_skip, emphasis)
    params = {name: pipe.params[name] for name, _ in encoders}
    ctx, pooled = encode(params, cond)
    if uncond is None:
        uctx, upooled = jnp.zeros_like(ctx), None if pooled is None else jnp.zeros_like(pooled)
    else:
        uctx, upooled = encode(params, uncond)

    def host(x: Any) -> np.ndarray | None:
        return None if x is None else np.repeat(np.asarray(x, np.float32), num_images_per_prompt, axis=0)

    return PromptEmbeds(host(ctx), host(uctx), host(pooled), host(upooled))
