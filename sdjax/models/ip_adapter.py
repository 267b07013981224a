"""IP-Adapter's image projections in Flax, as diffusers computes them: ``ImageProjection`` (IP-Adapter: the CLIP
image embedding -> a few context tokens) and ``IPAdapterPlusImageProjection`` (IP-Adapter Plus: a perceiver
resampler over the image encoder's penultimate hidden states). Their tokens feed the decoupled cross-attention
(``to_k_ip_j``/``to_v_ip_j`` in :class:`sdjax.models.transformer.Attention`).

Names follow diffusers' modules (``image_embeds``, ``norm``; ``proj_in``, ``layers_0/attn/to_q``, ``layers_0/ff_1/
net_0/proj``, ``norm_out``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.attention import attention
from sdjax.models.transformer import layer_norm


@dataclasses.dataclass(frozen=True)
class ImageProjectionConfig:
    """Plain IP-Adapter: ``image_embed_dim`` (the CLIP projection) -> ``num_tokens`` x ``cross_attention_dim``."""

    image_embed_dim: int
    cross_attention_dim: int
    num_tokens: int = 4


@dataclasses.dataclass(frozen=True)
class PlusProjectionConfig:
    """IP-Adapter Plus resampler (diffusers' IPAdapterPlusImageProjection)."""

    embed_dims: int  # the image encoder's hidden size
    output_dims: int  # the UNet's cross_attention_dim
    hidden_dims: int
    heads: int
    num_queries: int
    depth: int = 4
    dim_head: int = 64
    ffn_ratio: int = 4


class ImageProjection(nn.Module):
    config: ImageProjectionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        """(N, image_embed_dim) -> (N, num_tokens, cross_attention_dim)."""
        c = self.config
        x = nn.Dense(c.num_tokens * c.cross_attention_dim, dtype=self.dtype, name="image_embeds")(image_embeds)
        return layer_norm(self.dtype, "norm")(x.reshape(x.shape[0], c.num_tokens, c.cross_attention_dim))


class _ResamplerAttention(nn.Module):
    """diffusers' Attention(query_dim, dim_head, heads, out_bias=False): no biases anywhere."""

    heads: int
    dim_head: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        inner = self.heads * self.dim_head

        def project(name: str, y: jax.Array) -> jax.Array:
            out = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(y)
            return out.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)

        out = attention(project("to_q", x), project("to_k", context), project("to_v", context), implementation="xla")
        return nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="to_out_0")(
            out.reshape(x.shape[0], x.shape[1], inner))


class _FF1(nn.Module):
    """``ff_1``: diffusers' FeedForward(activation_fn="gelu", bias=False): net_0/proj -> exact GELU -> net_2."""

    dim: int
    ratio: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _Proj(self.dim * self.ratio, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="net_2")(nn.gelu(h, approximate=False))


class _Proj(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="proj")(x)


class _ResamplerBlock(nn.Module):
    config: PlusProjectionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        residual = latents
        context = layer_norm(self.dtype, "ln0")(x)
        latents = layer_norm(self.dtype, "ln1")(latents)
        context = jnp.concatenate([context, latents], axis=1)
        latents = _ResamplerAttention(self.config.heads, self.config.dim_head, self.dtype, name="attn")(
            latents, context) + residual
        # ``ff`` is Sequential(LayerNorm, FeedForward): ff_0, ff_1 by diffusers' keys.
        h = layer_norm(self.dtype, "ff_0")(latents)
        return _FF1(latents.shape[-1], self.config.ffn_ratio, self.dtype, name="ff_1")(h) + latents


class IPAdapterPlusImageProjection(nn.Module):
    config: PlusProjectionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        """(N, patches + 1, embed_dims) penultimate CLIP hidden states -> (N, num_queries, output_dims)."""
        c = self.config
        latents = self.param("latents", nn.initializers.normal(c.hidden_dims ** -0.5),
                             (1, c.num_queries, c.hidden_dims)).astype(self.dtype)
        latents = jnp.broadcast_to(latents, (hidden_states.shape[0],) + latents.shape[1:])
        x = nn.Dense(c.hidden_dims, dtype=self.dtype, name="proj_in")(hidden_states)
        for i in range(c.depth):
            latents = _ResamplerBlock(c, self.dtype, name=f"layers_{i}")(x, latents)
        latents = nn.Dense(c.output_dims, dtype=self.dtype, name="proj_out")(latents)
        return layer_norm(self.dtype, "norm_out")(latents)
