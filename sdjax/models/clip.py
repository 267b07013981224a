"""CLIP text encoders: OpenAI CLIP ViT-L/14 (SD 1.x, SDXL's first), OpenCLIP ViT-H (SD 2.x) and bigG (SDXL's
second, with its projection), as transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` compute them.

Submodules carry transformers' key names without the ``text_model.`` prefix, so conversion is mechanical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sdjax.config import ConfigError, parse_config
from sdjax.models.attention import attention

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")

# Legacy configs (eos_token_id=2, e.g. SD 1.x's) pool at argmax(input_ids), as transformers keeps doing.
LEGACY_EOS_TOKEN_ID = 2

# transformers config keys with no effect on inference (generation settings saved by older versions, etc.).
_IGNORED_KEYS = frozenset({
    "gradient_checkpointing", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "tie_encoder_decoder", "_flash_attn_2_enabled",
})


def check_tower(config: Any, what: str) -> None:
    """The checks a CLIP tower's config (text or vision) must pass: a supported activation, whole heads."""
    if config.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"unsupported {what}: hidden_act={config.hidden_act!r} (sdjax supports {ACTIVATIONS})")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"unsupported {what}: hidden_size={config.hidden_size} is not divisible by "
                          f"num_attention_heads={config.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields that change the computation; defaults are transformers' own."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        check_tower(self, "CLIPTextConfig")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers ``config.json`` of a CLIPTextModel or CLIPTextModelWithProjection."""
        return parse_config(
            cls, raw, required_values={"model_type": ("clip_text_model",)}, ignored=_IGNORED_KEYS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@struct.dataclass
class CLIPTextOutput:
    """``hidden_states``: embeddings then each layer's output (no final norm), as transformers'
    ``output_hidden_states``; ``pooled``: final-normed state at the EOS token; ``text_embeds``: its
    projection (None without one)."""

    hidden_states: tuple[jax.Array, ...]
    last_hidden_state: jax.Array
    pooled: jax.Array
    text_embeds: jax.Array | None = None


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    # transformers' "gelu" is the exact (erf) form.
    return lambda x: jax.nn.gelu(x, approximate=False)


def _layer_norm(config: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig  # or CLIPVisionConfig: the same fields
    dtype: Dtype = jnp.float32
    causal: bool = True  # the text tower's mask; the vision tower attends everywhere

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        heads_shape = x.shape[:2] + (c.num_attention_heads, c.head_dim)
        q, k, v = (nn.Dense(c.hidden_size, dtype=self.dtype, name=n)(x).reshape(heads_shape)
                   for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, causal=self.causal).reshape(x.shape[:2] + (c.hidden_size,))
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(_activation(c.hidden_act)(x))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block with (causal, for text) self-attention."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CLIPAttention(self.config, self.dtype, self.causal, name="self_attn")(
            _layer_norm(self.config, self.dtype, "layer_norm1")(x))
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(
            _layer_norm(self.config, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """All hidden states: the input, then each layer's output."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            states.append(CLIPEncoderLayer(self.config, self.dtype, self.causal, name=f"layers_{i}")(states[-1]))
        return tuple(states)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled token per sequence, by transformers' two rules.

    Legacy configs (``eos_token_id == 2``): argmax of the ids (the EOS, 49407, is the largest id). Otherwise
    the first position holding ``eos_token_id`` (the pad token may equal it), 0 if there is none.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    """CLIP text tower. ``with_projection`` adds SDXL bigG's ``text_projection`` (Dense, no bias)."""

    config: CLIPTextConfig
    with_projection: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this text encoder takes at most "
                             f"{c.max_position_embeddings}")
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        hidden_states = CLIPEncoder(c, self.dtype, name="encoder")(x)
        last = _layer_norm(c, self.dtype, "final_layer_norm")(hidden_states[-1])
        pooled = jnp.take_along_axis(last, eos_positions(input_ids, c.eos_token_id)[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if self.with_projection:
            text_embeds = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                                   name="text_projection")(pooled)
        return CLIPTextOutput(hidden_states=hidden_states, last_hidden_state=last, pooled=pooled,
                              text_embeds=text_embeds)
