"""A noise-aware classifier of the default model's latents, for classifier guidance (Dhariwal & Nichol 2021).

It reads exactly what the default model's UNet sees: the noised, scaled latent ``x_t = sqrt(abar_t) * z0 +
sqrt(1 - abar_t) * eps`` (NHWC, ``z0`` = VAE latent * scaling factor; sigma-space samplers hand the UNet
``x / sqrt(sigma^2 + 1)``, the same thing) and the timestep ``t`` (integer or fractional, in [0, 1000)). It
predicts the three labels of ``sdjax.data.shapes`` (shape, shape colour, background colour) like the pixel
classifier ``sdjax.classifier``::

    log_p = log_prob_fn("shape", "triangle")     # the shipped weights
    lp = log_p(x_t, t)                            # (B,) log p(shape = triangle | x_t, t)
    g = jax.grad(lambda x: log_p(x, t).sum())(x_t)

Weights ship in ``sdjax/assets/latent_classifier/`` (``model.safetensors`` + ``config.json``); they are made by
``examples/train_latent_classifier.py`` and fine-tuned on the default model's own samples, labelled by the pixel
classifier, by ``examples/finetune_latent_classifier.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.classifier import HEADS
from sdjax.models.layers import timestep_embedding

DEFAULT_PATH = Path(__file__).resolve().parent / "assets" / "latent_classifier"
# The CLI's spelling ("shape=triangle", "color=red", "background=blue"); "colour" is accepted too.
HEAD_ALIASES = {"colour": "color", "bg": "background"}

LogProb = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LatentClassifierConfig:
    latent_size: int = 8
    latent_channels: int = 4
    features: tuple[int, ...] = (64, 96)  # one level per entry; each level after the first halves h and w
    blocks: tuple[int, ...] = (2, 1)  # residual blocks per level
    time_dim: int = 128  # sinusoidal embedding width, as the UNet's (flip_sin_to_cos, no shift)
    hidden: int = 128
    groups: int = 8
    num_train_timesteps: int = 1000

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatentClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "heads": {k: list(v) for k, v in HEADS.items()},
                "input": "x_t (B, h, w, C) NHWC noised scaled latent, t (B,) or scalar timestep"}


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, with the time embedding as a FiLM (scale, shift) on the second norm."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = nn.Conv(self.features, (3, 3), padding=1, name="conv1")(nn.silu(nn.GroupNorm(self.groups, name="norm1")(x)))
        scale, shift = jnp.split(nn.Dense(2 * self.features, name="time_proj")(temb)[:, None, None, :], 2, axis=-1)
        h = nn.GroupNorm(self.groups, name="norm2")(h) * (1.0 + scale) + shift
        h = nn.Conv(self.features, (3, 3), padding=1, name="conv2")(nn.silu(h))
        return x + h


class LatentClassifier(nn.Module):
    """(x_t (B, h, w, C), t (B,)) -> {"shape": (B, 3), "color": (B, 6), "background": (B, 6)} logits.

    Smooth activations, per-sample normalisation only (no batch statistics): its gradient in x_t is well
    behaved, which is what guidance uses.
    """

    config: LatentClassifierConfig = LatentClassifierConfig()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
        cfg = self.config
        x = x.astype(jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
        temb = timestep_embedding(t, cfg.time_dim)
        temb = nn.Dense(cfg.hidden, name="time_1")(temb)
        temb = nn.Dense(cfg.hidden, name="time_2")(nn.silu(temb))
        temb = nn.silu(temb)
        h = nn.Conv(cfg.features[0], (3, 3), padding=1, name="conv_in")(x)
        for level, (f, n) in enumerate(zip(cfg.features, cfg.blocks, strict=True)):
            if level:
                h = nn.Conv(f, (3, 3), strides=(2, 2), padding=1, name=f"down_{level}")(nn.silu(h))
            for j in range(n):
                h = ResBlock(f, cfg.groups, name=f"block_{level}_{j}")(h, temb)
        h = nn.silu(nn.GroupNorm(cfg.groups, name="norm_out")(h)).mean(axis=(1, 2))
        h = nn.silu(nn.Dense(cfg.hidden, name="hidden")(jnp.concatenate([h, temb], axis=-1)))
        return {name: nn.Dense(len(labels), name=f"head_{name}")(h) for name, labels in HEADS.items()}


def init_params(key: jax.Array, config: LatentClassifierConfig = LatentClassifierConfig()) -> dict[str, Any]:
    x = jnp.zeros((1, config.latent_size, config.latent_size, config.latent_channels), jnp.float32)
    return LatentClassifier(config).init(key, x, jnp.zeros((1,), jnp.float32))["params"]


def latent_logits(params: Any, config: LatentClassifierConfig, x_t: jax.Array, t: Any) -> dict[str, jax.Array]:
    """Logits per head for noised latents ``x_t`` (B, h, w, C) at timestep ``t`` (scalar or (B,)).
    Differentiable in ``params`` and ``x_t``; jittable."""
    if x_t.ndim != 4 or x_t.shape[-1] != config.latent_channels:
        raise ValueError(f"x_t must be NHWC latents (B, h, w, {config.latent_channels}), got shape {x_t.shape}")
    return LatentClassifier(config).apply({"params": params}, x_t, t)


def parse_target(text: str) -> tuple[str, str]:
    """``"shape=triangle"`` -> ``("shape", "triangle")``; heads: shape, color (or colour), background."""
    if not isinstance(text, str) or text.count("=") != 1:
        raise ValueError(f"classifier target {text!r}: write HEAD=VALUE, e.g. shape=triangle; {_valid()}")
    head, value = (part.strip().lower() for part in text.split("="))
    head = HEAD_ALIASES.get(head, head)
    check_target(head, value)
    return head, value


def check_target(head: str, value: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown classifier head {head!r}; {_valid()}")
    if value not in HEADS[head]:
        raise ValueError(f"unknown {head} {value!r}; choose one of: {', '.join(HEADS[head])}")


def _valid() -> str:
    return "valid targets: " + "; ".join(f"{h}={'|'.join(v)}" for h, v in HEADS.items())


def log_prob_fn(head: str, value: str, params: Any = None, config: LatentClassifierConfig | None = None
                ) -> LogProb:
    """``log_prob(x_t, t) -> (B,)``: log-softmax of class ``value`` of ``head`` (names as in
    ``sdjax.data.shapes``). Default params/config: the shipped classifier."""
    head = HEAD_ALIASES.get(head, head)
    check_target(head, value)
    if params is None:
        params, loaded = _shipped()
        config = config or loaded
    config = config or LatentClassifierConfig()
    index = HEADS[head].index(value)

    def log_prob(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(latent_logits(params, config, x_t, t)[head], axis=-1)[:, index]

    return log_prob


def batch_log_prob_fn(targets: Sequence[tuple[str, str]], weights: Sequence[float] | None = None,
                      params: Any = None, config: LatentClassifierConfig | None = None) -> LogProb:
    """``log_prob(x_t, t) -> (B,)`` with image i towards ``targets[i]`` (a (head, value) pair), times
    ``weights[i]`` (default 1): several targets, each at its own scale, guided in one batch and one compile.
    The batch must have ``len(targets)`` images."""
    pairs = [(HEAD_ALIASES.get(h, h), v) for h, v in targets]
    for head, value in pairs:
        check_target(head, value)
    if params is None:
        params, loaded = _shipped()
        config = config or loaded
    config = config or LatentClassifierConfig()
    index = {head: jnp.asarray([HEADS[head].index(v) if h == head else 0 for h, v in pairs], jnp.int32)
             for head in HEADS}
    chosen = {head: jnp.asarray([h == head for h, _ in pairs], jnp.float32) for head in HEADS}
    scale = jnp.asarray(np.ones(len(pairs)) if weights is None else weights, jnp.float32)
    if scale.shape != (len(pairs),):
        raise ValueError(f"batch_log_prob_fn: {len(pairs)} targets but weights of shape {scale.shape}")

    def log_prob(x_t: jax.Array, t: jax.Array) -> jax.Array:
        if x_t.shape[0] != len(pairs):
            raise ValueError(f"batch_log_prob_fn has {len(pairs)} targets for a batch of {x_t.shape[0]}")
        logits = latent_logits(params, config, x_t, t)
        total = 0.0
        for head in HEADS:
            logp = jax.nn.log_softmax(logits[head], axis=-1)
            total = total + chosen[head] * jnp.take_along_axis(logp, index[head][:, None], axis=-1)[:, 0]
        return scale * total

    return log_prob


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[dict[str, Any], LatentClassifierConfig]:
    return load_latent_classifier()


# --- weights on disk: safetensors (flat "a/b/kernel" keys, float16) + config.json ------------------------------


def save_latent_classifier(params: Any, config: LatentClassifierConfig, folder: str | Path,
                           extra: dict[str, Any] | None = None) -> Path:
    """Weights as float16 safetensors (loaded back as float32) and the config with ``extra`` (training log)."""
    from sdjax.params_file import save_params

    return save_params(params, {**config.to_dict(), **(extra or {})}, folder, dtype=np.float16)


def load_latent_classifier(path: str | Path | None = None) -> tuple[dict[str, Any], LatentClassifierConfig]:
    """(params, config) from a folder written by :func:`save_latent_classifier`; default: the shipped one."""
    from sdjax.params_file import load_params, read_config

    root = DEFAULT_PATH if path is None else Path(path)
    config = LatentClassifierConfig.from_dict(read_config(root, "latent classifier"))
    return load_params(root, lambda key: init_params(key, config), "latent classifier"), config
