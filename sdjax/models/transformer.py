"""diffusers' Transformer2DModel (continuous input) for the UNet: GroupNorm -> proj_in -> BasicTransformerBlocks
(self-attention, cross-attention, GEGLU feed-forward) -> proj_out -> residual. NHWC in and out.

Names mirror the PyTorch keys (``norm``, ``proj_in``, ``transformer_blocks_0/attn1/to_q``, ``ff/net_0/proj``,
``ff/net_2``, ``proj_out``) so checkpoints map on mechanically. ``proj_in``/``proj_out`` are Dense layers on
(B, H*W, C) whether the checkpoint stores them as Linear (``use_linear_projection``) or as 1x1 convs: the math is
the same, and the converter squeezes 1x1 conv kernels.

``matmul_dtype`` (opt-in, e.g. ``jnp.bfloat16``): every matmul here, attention included, takes inputs in that
dtype and accumulates in float32; weights, norms and the residual stream stay in ``dtype``. On CPU this is the
one lever PERF_NOTES found for the transformer blocks, at bf16-level accuracy (not fp32 parity).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.attention import attention
from sdjax.models.hypernetwork import HypernetworkSpec, apply_hypernetworks
from sdjax.models.layers import group_norm

Dtype = jnp.dtype


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    # torch.nn.LayerNorm's eps and two-pass variance.
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


def _low_precision_dot(matmul_dtype: Dtype):
    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        return jax.lax.dot_general(lhs.astype(matmul_dtype), rhs.astype(matmul_dtype), dimension_numbers,
                                   precision=precision, preferred_element_type=jnp.float32)
    return dot_general


def dense(features: int, dtype: Dtype, matmul_dtype: Dtype | None, name: str, use_bias: bool = True) -> nn.Dense:
    """nn.Dense; with ``matmul_dtype``, its inputs are cast to it and the product accumulates in float32."""
    dot = _low_precision_dot(matmul_dtype) if matmul_dtype is not None else None
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, dot_general=dot, name=name)


class Attention(nn.Module):
    """diffusers' ``Attention`` as used by BasicTransformerBlock: no q/k/v bias, biased output projection.

    Self-attention when ``context`` is None, else cross-attention over ``context`` (B, Lk, C_ctx).
    ``hypernetworks``: A1111 hypernetworks transforming the context before ``to_k`` / ``to_v`` (where they have
    an entry for its width).
    """

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Dtype | None = None
    hypernetworks: tuple[HypernetworkSpec, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context
        batch, lq = x.shape[:2]
        io_dtype = self.matmul_dtype or self.dtype

        def project(name: str, y: jax.Array) -> jax.Array:
            # (B, L, H*D) -> (B, L, H, D) is a free reshape; the attention function takes this layout directly.
            out = dense(inner, self.dtype, self.matmul_dtype, name, use_bias=False)(y)
            return out.astype(io_dtype).reshape(batch, y.shape[1], self.heads, self.head_dim)

        k_in, v_in = apply_hypernetworks(self.hypernetworks, context) if self.hypernetworks else (context, context)
        q, k, v = project("to_q", x), project("to_k", k_in), project("to_v", v_in)
        out = attention(q, k, v, implementation=self.attention_impl).reshape(batch, lq, inner)
        return dense(x.shape[-1], self.dtype, self.matmul_dtype, "to_out_0")(out)


class GEGLU(nn.Module):
    """One matmul to (value, gate), then value * GELU(gate) (exact erf GELU as torch's default)."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.inner_dim, self.dtype, self.matmul_dtype, "proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``ff``: net_0 = GEGLU(dim -> 4 dim), net_1 = dropout (nothing at inference), net_2 = Linear(4 dim -> dim)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, matmul_dtype=self.matmul_dtype, name="net_0")(x)
        return dense(dim, self.dtype, self.matmul_dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
    """LayerNorm -> self-attn -> +x; LayerNorm -> cross-attn -> +x; LayerNorm -> GEGLU FF -> +x."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Dtype | None = None
    hypernetworks: tuple[HypernetworkSpec, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def attn(name: str) -> Attention:
            return Attention(self.heads, self.head_dim, dtype=self.dtype, attention_impl=self.attention_impl,
                             matmul_dtype=self.matmul_dtype, hypernetworks=self.hypernetworks, name=name)

        x = attn("attn1")(layer_norm(self.dtype, "norm1")(x)) + x
        x = attn("attn2")(layer_norm(self.dtype, "norm2")(x), context) + x
        ff = FeedForward(dtype=self.dtype, matmul_dtype=self.matmul_dtype, name="ff")
        return ff(layer_norm(self.dtype, "norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer over an NHWC feature map, conditioned on ``context`` (B, L, cross_attention_dim)."""

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    matmul_dtype: Dtype | None = None
    hypernetworks: tuple[HypernetworkSpec, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        h = dense(inner, self.dtype, self.matmul_dtype, "proj_in")(h.reshape(batch, height * width, channels))
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, dtype=self.dtype, attention_impl=self.attention_impl,
                                      matmul_dtype=self.matmul_dtype, hypernetworks=self.hypernetworks,
                                      name=f"transformer_blocks_{i}")(h, context)
        h = dense(channels, self.dtype, self.matmul_dtype, "proj_out")(h)
        return h.reshape(batch, height, width, channels) + x
