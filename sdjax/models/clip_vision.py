"""transformers' CLIPVisionModelWithProjection in Flax: the image encoder of IP-Adapter (OpenCLIP ViT-H/14 for
SD 1.5 and most SDXL adapters, ViT-bigG/14 for the original SDXL ones).

Patch embedding (a stride-``patch_size`` conv without bias) + class token + positions -> ``pre_layrnorm`` ->
the text tower's encoder layers (:class:`sdjax.models.clip.CLIPEncoder`) without the causal mask ->
``post_layernorm`` on the class token -> ``visual_projection``. Submodules carry transformers' names without the
``vision_model.`` prefix (``embeddings/patch_embedding``, ``encoder/layers_3/self_attn/q_proj``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sdjax.models.clip import _IGNORED_KEYS, CLIPEncoder, _layer_norm, check_tower
from sdjax.models.config import parse_config


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields that change the computation (its defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_tower(self, "CLIPVisionConfig")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a ``config.json`` of a CLIPVisionModelWithProjection (or a full CLIP model's ``vision_config``)."""
        raw = dict(raw.get("vision_config", raw))
        return parse_config(cls, raw, required_values={"model_type": ("clip_vision_model",)},
                            ignored=_IGNORED_KEYS | {"dropout"}, what="CLIPVisionConfig")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


# The image encoders IP-Adapter uses (laion's OpenCLIP ViT-H-14 and ViT-bigG-14, as h94/IP-Adapter ships them).
VIT_H_14 = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                            num_attention_heads=16, patch_size=14, hidden_act="gelu")
VIT_BIGG_14 = CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, projection_dim=1280, num_hidden_layers=48,
                               num_attention_heads=16, patch_size=14, hidden_act="gelu")


@struct.dataclass
class CLIPVisionOutput:
    """``hidden_states``: the pre-normed embeddings, then each layer's output (transformers'
    ``output_hidden_states``; IP-Adapter Plus reads ``hidden_states[-2]``); ``image_embeds``: the projection."""

    hidden_states: tuple[jax.Array, ...]
    last_hidden_state: jax.Array
    pooled: jax.Array
    image_embeds: jax.Array


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixels)
        batch = pixels.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,)).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, c.hidden_size)), patches], axis=1)
        positions = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(c.num_positions))
        return x + positions[None]


class CLIPVisionModelWithProjection(nn.Module):
    """pixel_values (B, image_size, image_size, num_channels) NHWC, CLIP-normalised -> :class:`CLIPVisionOutput`."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"CLIP vision input must be NHWC (batch, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}); got {tuple(pixel_values.shape)}")
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values.astype(self.dtype))
        x = _layer_norm(c, self.dtype, "pre_layrnorm")(x)  # transformers' spelling
        hidden_states = CLIPEncoder(c, self.dtype, causal=False, name="encoder")(x)
        last = hidden_states[-1]
        pooled = _layer_norm(c, self.dtype, "post_layernorm")(last[:, 0])
        image_embeds = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
        return CLIPVisionOutput(hidden_states=hidden_states, last_hidden_state=last, pooled=pooled,
                                image_embeds=image_embeds)
