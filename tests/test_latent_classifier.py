"""The shipped noise-aware latent classifier (``sdjax.latent_classifier``) of the default model.

Fresh shapes images (a seed the training never drew) are VAE-encoded with the default model's VAE, scaled,
and noised with its own schedule to t = 0, 250, 950: the classifier must read them at low noise and fall
towards chance at high noise. Measured after fine-tuning on the model's own samples
(examples/finetune_latent_classifier.py; its config.json) on 1000 held-out latents, shape / colour /
background: t=0 100/99.8/100 %, t=250 98/99.4/99.9 %, t=500 82.5/91.7/99.4 %, t=750 49.5/52/78 %, t=950
38/25/38 % (chance: 33/17/17 %); on this test's 256 latents t=0 100 %, t=250 98.8/99.6/100 %, t=950
38/21/45 %. BOUNDS sit a few points under those numbers (256 images: a binomial sd of ~1 point at 97 %).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from sdjax.classifier import HEADS
from sdjax.data import shapes
from sdjax.latent_classifier import (
    DEFAULT_PATH,
    LatentClassifierConfig,
    batch_log_prob_fn,
    init_params,
    latent_logits,
    load_latent_classifier,
    log_prob_fn,
    parse_target,
    save_latent_classifier,
)
from sdjax.models.vae import AutoencoderKL, scale_latents
from sdjax.samplers.schedules import alphas_cumprod

pytestmark = pytest.mark.usefixtures("optimized")  # many samples of the default model: run time dominates

N = 256
# Minimum accuracy per head at t = 0 and t = 250 (shape, colour, background).
BOUNDS = {0: {"shape": 0.97, "color": 0.97, "background": 0.98},
          250: {"shape": 0.95, "color": 0.97, "background": 0.98}}
MAX_SIZE_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def latents():
    """(scaled clean latents (N, 8, 8, 4), labels (N, 3), alphas_cumprod) for fresh images."""
    pipe = sdjax.load()
    batch = shapes.make_batch(987_654, N)
    mean, _ = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x * 2 - 1, method=AutoencoderKL.encode))(
        pipe.params["vae"], jnp.asarray(batch.images))
    return scale_latents(mean, pipe.vae.config), batch.labels, alphas_cumprod(pipe.scheduler)


@pytest.fixture(scope="module")
def shipped():
    return load_latent_classifier()


def _accuracy(shipped, latents, t: int) -> dict[str, float]:
    params, config = shipped
    z0, labels, ac = latents
    eps = jax.random.normal(jax.random.key(t + 1), z0.shape)
    x_t = ac[t] ** 0.5 * z0 + (1 - ac[t]) ** 0.5 * eps
    logits = jax.jit(lambda p, x: latent_logits(p, config, x, jnp.float32(t)))(params, x_t)
    return {k: float(np.mean(np.argmax(np.asarray(logits[k]), -1) == labels[:, i])) for i, k in enumerate(HEADS)}


def test_shipped_files_are_small_and_described():
    size = sum(p.stat().st_size for p in DEFAULT_PATH.iterdir())
    assert size <= MAX_SIZE_BYTES, f"latent classifier assets are {size} bytes"
    config = json.loads((DEFAULT_PATH / "config.json").read_text())
    assert config["heads"] == {k: list(v) for k, v in HEADS.items()}
    assert "held_out_accuracy" in config["training"]


def test_accuracy_high_at_low_noise_and_falls_with_noise(shipped, latents):
    table = {t: _accuracy(shipped, latents, t) for t in (0, 250, 950)}
    print(table)
    for t, bounds in BOUNDS.items():
        for head, bound in bounds.items():
            assert table[t][head] >= bound, f"t={t} {head}: accuracy {table[t][head]:.3f} < {bound}"
    for head in HEADS:
        # Near pure noise (abar(950) ~ 0.01) each head is far less sure than at t = 0.
        assert table[950][head] <= table[0][head] - 0.25, f"{head} does not degrade with noise: {table}"


def test_log_prob_fn_shape_and_gradient(shipped, latents):
    params, config = shipped
    z0, _, ac = latents
    x = ac[500] ** 0.5 * z0[:5] + (1 - ac[500]) ** 0.5 * jax.random.normal(jax.random.key(3), z0[:5].shape)
    log_p = log_prob_fn("shape", "triangle", params, config)
    default = log_prob_fn("shape", "triangle")  # the shipped weights, loaded on demand
    for t in (jnp.float32(500.0), jnp.full((5,), 437.25, jnp.float32)):  # scalar, per-image fractional
        lp = log_p(x, t)
        assert lp.shape == (5,) and bool(jnp.all(lp <= 0))
        np.testing.assert_allclose(np.asarray(default(x, t)), np.asarray(lp), rtol=1e-6)
        grad = jax.jit(jax.grad(lambda x, t: log_p(x, t).sum()))(x, t)
        assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
        assert float(jnp.abs(grad).max()) > 1e-4
    # Each image's log-probability depends only on its own latent.
    jac = jax.jacobian(lambda x: log_p(x, jnp.float32(500.0)))(x[:2])
    assert float(jnp.abs(jac[0, 1]).max()) == 0.0 and float(jnp.abs(jac[0, 0]).max()) > 0
    # The classes of one head are a distribution.
    total = sum(jnp.exp(log_prob_fn("color", c, params, config)(x, jnp.float32(500.0))) for c in HEADS["color"])
    np.testing.assert_allclose(np.asarray(total), 1.0, rtol=1e-5)
    # Several targets in one batch, each with its own weight: image i is log_prob_fn(targets[i]) * weights[i].
    targets = [("shape", "circle"), ("colour", "red"), ("background", "blue"), ("shape", "square"), ("bg", "red")]
    weights = [1.0, 4.0, 0.5, 2.0, 3.0]
    batched = batch_log_prob_fn(targets, weights, params, config)(x, jnp.float32(500.0))
    singles = [w * log_prob_fn(h, v, params, config)(x, jnp.float32(500.0))[i]
               for i, ((h, v), w) in enumerate(zip(targets, weights, strict=True))]
    np.testing.assert_allclose(np.asarray(batched), np.asarray(singles), rtol=1e-5)
    with pytest.raises(ValueError, match="5 targets for a batch of 2"):
        batch_log_prob_fn(targets, params=params, config=config)(x[:2], jnp.float32(500.0))


def test_parse_target():
    assert parse_target("shape=triangle") == ("shape", "triangle")
    assert parse_target(" Colour = red ") == ("color", "red")
    assert parse_target("background=black") == ("background", "black")
    with pytest.raises(ValueError, match="HEAD=VALUE.*shape=circle\\|square\\|triangle"):
        parse_target("triangle")
    with pytest.raises(ValueError, match="unknown classifier head 'size'.*valid targets"):
        parse_target("size=big")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'; choose one of: circle, square, triangle"):
        parse_target("shape=hexagon")
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        log_prob_fn("color", "purple")


def test_save_load_roundtrip_and_mismatch(tmp_path):
    config = LatentClassifierConfig(features=(16, 24), blocks=(1, 1), time_dim=32, hidden=32, groups=4)
    params = init_params(jax.random.key(1), config)
    save_latent_classifier(params, config, tmp_path / "lc")
    loaded, loaded_config = load_latent_classifier(tmp_path / "lc")
    assert loaded_config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)  # float16 on disk
    raw = json.loads((tmp_path / "lc" / "config.json").read_text())
    (tmp_path / "lc" / "config.json").write_text(json.dumps({**raw, "hidden": 48}))
    with pytest.raises(ValueError, match="do not match its config"):
        load_latent_classifier(tmp_path / "lc")
    with pytest.raises(FileNotFoundError, match="no latent classifier here"):
        load_latent_classifier(tmp_path / "missing")
    with pytest.raises(ValueError, match="NHWC latents"):
        latent_logits(params, config, jnp.ones((2, 8, 8, 3)), 10.0)
