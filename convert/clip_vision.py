"""transformers CLIPVisionModelWithProjection state dicts -> sdjax ``CLIPVisionModelWithProjection`` params.

Keys are ``vision_model.embeddings...`` / ``vision_model.encoder.layers.N...`` plus the unprefixed
``visual_projection.weight``; the ``vision_model.`` prefix is dropped (it may also be absent).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

from .weights import Params, to_flax_params

PREFIX = "vision_model."
IGNORE = (r"(^|\.)position_ids$",)


@functools.cache
def clip_vision_param_shapes(config: CLIPVisionConfig) -> Params:
    """The params tree (``jax.ShapeDtypeStruct`` leaves) of the vision tower; cached, read-only."""
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    model = CLIPVisionModelWithProjection(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), pixels))["params"]


def convert_clip_vision(state_dict: Mapping[str, np.ndarray], config: CLIPVisionConfig, *, dtype: Any = None
                        ) -> Params:
    """Raises ``WeightMismatchError`` naming every missing, unexpected or wrongly shaped weight."""
    return to_flax_params(state_dict, clip_vision_param_shapes(config), ignore=IGNORE,
                          rename=lambda k: k.removeprefix(PREFIX), dtype=dtype, what="CLIP image encoder")
