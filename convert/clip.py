"""transformers CLIP text encoder state dicts -> sdjax ``CLIPTextModel`` params.

Two key layouts exist for the same weights: ``text_model.embeddings...`` (hub folders; every
``CLIPTextModelWithProjection``; ``CLIPTextModel`` saved by transformers < 5.6) and the bare
``embeddings...`` (``CLIPTextModel`` saved by newer transformers). Both are accepted. ``text_projection.weight``
(SDXL's bigG) never has the prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip import CLIPTextConfig, CLIPTextModel

from .weights import Params, to_flax_params

PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
# Non-persistent buffers that older checkpoints still carry.
IGNORE = (r"(^|\.)position_ids$",)


@functools.cache
def clip_param_shapes(config: CLIPTextConfig, with_projection: bool) -> Params:
    """The params tree (``jax.ShapeDtypeStruct`` leaves) of ``CLIPTextModel(config, with_projection)``.

    Cached per config: treat the returned tree as read-only.
    """
    model = CLIPTextModel(config, with_projection=with_projection)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


def has_projection(state_dict: Mapping[str, Any]) -> bool:
    """Whether the checkpoint is a ``CLIPTextModelWithProjection`` (has ``text_projection.weight``)."""
    return PROJECTION_KEY in state_dict or (PREFIX + PROJECTION_KEY) in state_dict


def architectures_have_projection(raw_config: Mapping[str, Any]) -> bool:
    """Whether a transformers ``config.json`` names ``CLIPTextModelWithProjection``."""
    return "CLIPTextModelWithProjection" in (raw_config.get("architectures") or ())


def _strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def convert_clip_text(
    state_dict: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    *,
    with_projection: bool,
    dtype: Any = None,
) -> Params:
    """Map a transformers CLIP text encoder state dict (either key layout) onto sdjax params.

    Raises ``WeightMismatchError`` listing every missing, unexpected or wrongly shaped weight (a projection
    present without ``with_projection`` is unexpected; one missing with it is missing).
    """
    return to_flax_params(
        state_dict,
        clip_param_shapes(config, with_projection),
        ignore=IGNORE,
        rename=_strip_prefix,
        dtype=dtype,
        what="CLIP text encoder" + (" with projection" if with_projection else ""),
    )
