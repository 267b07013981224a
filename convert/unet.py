"""diffusers UNet2DConditionModel state dict -> sdjax UNet params.

The Flax modules carry the diffusers key names, so this is :func:`to_flax_params` against the model's own
parameter shapes: every weight is checked, and missing / unexpected / wrongly shaped keys are reported together.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sdjax.convert.weights import Params, to_flax_params
from sdjax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs


def _as_config(config: UNetConfig | Mapping[str, Any]) -> UNetConfig:
    return config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)


def unet_param_shapes(config: UNetConfig | Mapping[str, Any]) -> Params:
    """The params tree of ``UNet2DConditionModel(config)`` as ``jax.ShapeDtypeStruct`` leaves (nothing computed).

    Cached per config: treat the returned tree as read-only."""
    return _unet_param_shapes(_as_config(config))


@functools.cache
def _unet_param_shapes(config: UNetConfig) -> Params:
    args, kwargs = example_inputs(config, time_ids=1)  # the weights only see the total text_time width
    model = UNet2DConditionModel(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    return shapes["params"]


def convert_unet(
    state_dict: Mapping[str, np.ndarray],
    config: UNetConfig | Mapping[str, Any],
    *,
    dtype: Any = None,
) -> Params:
    """Map a diffusers UNet state dict (key -> array, PyTorch layout) onto sdjax params (numpy arrays).

    ``dtype`` casts every weight (e.g. ``jnp.bfloat16``); None keeps the checkpoint's dtype.
    Raises ``WeightMismatchError`` naming every missing, unexpected or wrongly shaped weight.
    """
    return to_flax_params(state_dict, unet_param_shapes(config), dtype=dtype, what="UNet")
