"""A small CNN that reads a 64x64 shapes image (``sdjax.data.shapes``): which shape, its colour, the background.

It is the quality check of the default model (does "a red circle on a blue background" give one?) and, being
a plain differentiable function, the classifier for classifier guidance via ``jax.grad``::

    params, config = load_classifier()
    logits = classify(params, images)             # images (B, 64, 64, 3) in [0, 1]
    log_p = jax.nn.log_softmax(logits["shape"])   # also "color" and "background"

Weights ship in ``sdjax/assets/shape_classifier/`` (``model.safetensors`` + ``config.json``); they are made by
``examples/train_classifier.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.data.shapes import COLORS, SHAPES

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "background": COLORS}
DEFAULT_PATH = Path(__file__).resolve().parent / "assets" / "shape_classifier"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 64
    features: tuple[int, ...] = (24, 48, 64, 64)  # one stride-2 3x3 conv per level: 32, 16, 8, 4 pixels
    extra_convs_from: int = 2  # levels from this one on add a residual stride-1 3x3 conv
    hidden: int = 128

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "heads": {k: list(v) for k, v in HEADS.items()},
                "input": "(B, H, W, 3) float in [0, 1], NHWC"}


class ShapeClassifier(nn.Module):
    """Images (B, 64, 64, 3) in [0, 1] -> {"shape": (B, 3), "color": (B, 6), "background": (B, 6)} logits.

    Smooth activations (SiLU) and no batch statistics, so gradients with respect to the image are well behaved.
    """

    config: ClassifierConfig = ClassifierConfig()

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = images.astype(jnp.float32) * 2.0 - 1.0
        for i, f in enumerate(self.config.features):
            x = nn.silu(nn.Conv(f, (3, 3), strides=(2, 2), padding=1, name=f"down_{i}")(x))
            if i >= self.config.extra_convs_from:
                x = nn.silu(nn.Conv(f, (3, 3), padding=1, name=f"conv_{i}")(x)) + x
        x = x.reshape(x.shape[0], -1)
        x = nn.silu(nn.Dense(self.config.hidden, name="hidden")(x))
        return {name: nn.Dense(len(labels), name=f"head_{name}")(x) for name, labels in HEADS.items()}


def init_params(key: jax.Array, config: ClassifierConfig = ClassifierConfig()) -> dict[str, Any]:
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return ShapeClassifier(config).init(key, images)["params"]


def classify(params: Any, images_0_1: jax.Array, config: ClassifierConfig = ClassifierConfig()) -> dict[str, jax.Array]:
    """Logits per head for images (B, H, W, 3) in [0, 1]. Differentiable in both ``params`` and the images."""
    return ShapeClassifier(config).apply({"params": params}, images_0_1)


def predict(params: Any, images_0_1: Any, config: ClassifierConfig = ClassifierConfig(),
            batch_size: int = 256) -> np.ndarray:
    """(N, 3) int labels (shape, colour, background), as ``sdjax.data.shapes`` numbers them."""
    fn = _jitted_argmax(config)
    images = np.asarray(images_0_1, np.float32)
    out = [np.asarray(fn(params, images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 3), np.int32)


_ARGMAX_CACHE: dict[ClassifierConfig, Any] = {}


def _jitted_argmax(config: ClassifierConfig) -> Any:
    if config not in _ARGMAX_CACHE:
        def fn(params: Any, images: jax.Array) -> jax.Array:
            logits = classify(params, images, config)
            return jnp.stack([jnp.argmax(logits[k], -1) for k in HEADS], axis=-1).astype(jnp.int32)

        _ARGMAX_CACHE[config] = jax.jit(fn)
    return _ARGMAX_CACHE[config]


def describe(labels: Any) -> list[str]:
    """Caption text for predicted labels (N, 3)."""
    from sdjax.data.shapes import caption

    return [caption(*map(int, row)) for row in np.asarray(labels)]


# --- weights on disk: safetensors (flat "a/b/kernel" keys) + config.json --------------------------------------


def save_classifier(params: Any, config: ClassifierConfig, folder: str | Path,
                    extra: dict[str, Any] | None = None) -> Path:
    from sdjax.params_file import save_params

    return save_params(params, {**config.to_dict(), **(extra or {})}, folder)


def load_classifier(folder: str | Path | None = None) -> tuple[dict[str, Any], ClassifierConfig]:
    """(params, config) from a folder written by :func:`save_classifier`; default: the shipped classifier."""
    from sdjax.params_file import load_params, read_config

    folder = DEFAULT_PATH if folder is None else Path(folder)
    config = ClassifierConfig.from_dict(read_config(folder, "classifier"))
    return load_params(folder, lambda key: init_params(key, config), "classifier"), config
