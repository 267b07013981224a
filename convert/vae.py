"""diffusers AutoencoderKL state dict -> sdjax VAE params."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.convert.weights import Params, to_flax_params
from sdjax.models.vae import AutoencoderKL, VAEConfig

# Older diffusers folders (before the Attention refactor) name the VAE mid-block attention's projections
# query/key/value/proj_attn; the tensors are the same Linear weights.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def _rename(key: str) -> str:
    return _LEGACY_RE.sub(lambda m: m.group(1) + _LEGACY_ATTENTION[m.group(2)] + ".", key)


@functools.cache
def vae_param_shapes(config: VAEConfig) -> Params:
    """The VAE's params tree as ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
    f = config.downsample_factor
    images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.PRNGKey(0), x), images)
    return shapes["params"]


def convert_vae(state_dict: Mapping[str, Any], config: VAEConfig, *, dtype: Any = None) -> Params:
    """Map a diffusers ``AutoencoderKL`` state dict (current or legacy attention names) onto sdjax params."""
    return to_flax_params(state_dict, vae_param_shapes(config), rename=_rename, dtype=dtype,
                          what="AutoencoderKL (VAE)")
