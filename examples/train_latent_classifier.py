"""Train the noise-aware latent classifier (``sdjax.latent_classifier``) for the default model and save it to
``sdjax/assets/latent_classifier/``.

    python examples/train_latent_classifier.py [--steps 3000] [--out FOLDER]

Synthetic shapes images (``sdjax.data.shapes``) are VAE-encoded once with the default model's VAE; every step
draws a posterior sample of each latent (scaled as the UNet's training data was), a timestep t uniform in
[0, T - 1] (fractional: sigma-space samplers hand the UNet fractional timesteps) and noises it with the default
model's own schedule, ``x_t = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * eps``. Loss: cross-entropy summed over the
three heads. Fixed seed; prints held-out accuracy per head at several noise levels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sdjax
from sdjax.classifier import HEADS
from sdjax.data import shapes
from sdjax.latent_classifier import (
    DEFAULT_PATH,
    LatentClassifierConfig,
    init_params,
    latent_logits,
    save_latent_classifier,
)
from sdjax.models.vae import AutoencoderKL
from sdjax.samplers.schedules import alphas_cumprod

EVAL_TIMESTEPS = (0, 250, 500, 750, 950)


def encode(pipe, images: np.ndarray, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """VAE posterior (mean, logvar) of images in [0, 1], unscaled."""
    fn = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x * 2.0 - 1.0, method=AutoencoderKL.encode))
    out = [fn(pipe.params["vae"], jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return (np.concatenate([np.asarray(m, np.float32) for m, _ in out]),
            np.concatenate([np.asarray(lv, np.float32) for _, lv in out]))


def abar_at(log_sigmas: jax.Array, t: jax.Array) -> jax.Array:
    """alpha-bar at fractional timesteps: linear in log sigma between training timesteps, as diffusers'
    sigma-to-t conversion (exact at integer t)."""
    log_sigma = jnp.interp(t, jnp.arange(log_sigmas.shape[0], dtype=jnp.float32), log_sigmas)
    return 1.0 / (1.0 + jnp.exp(2.0 * log_sigma))


def noised(mean, logvar, scale, abar, key):
    """A posterior sample of each latent, scaled, noised to alpha-bar ``abar`` (B,)."""
    k_post, k_eps = jax.random.split(key)
    z0 = scale * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_post, mean.shape))
    a = abar[:, None, None, None]
    return jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * jax.random.normal(k_eps, z0.shape)


def accuracy_table(params, config, means, logvars, labels, scale, ac, key, timesteps=EVAL_TIMESTEPS,
                   batch: int = 500) -> dict[int, dict[str, float]]:
    """Held-out accuracy per head at each integer timestep (one noise draw per latent)."""
    logits_fn = jax.jit(lambda p, x, t: latent_logits(p, config, x, t))
    table = {}
    for t in timesteps:
        hits = {k: 0 for k in HEADS}
        for i in range(0, len(means), batch):
            sl = slice(i, i + batch)
            n = len(means[sl])
            abar = jnp.full((n,), ac[t], jnp.float32)
            x = noised(jnp.asarray(means[sl]), jnp.asarray(logvars[sl]), scale, abar,
                       jax.random.fold_in(key, i * 7 + t))
            logits = logits_fn(params, x, jnp.full((n,), float(t), jnp.float32))
            for j, k in enumerate(HEADS):
                hits[k] += int(np.sum(np.argmax(np.asarray(logits[k]), -1) == labels[sl, j]))
        table[t] = {k: round(v / len(means), 4) for k, v in hits.items()}
    return table


def train(step, params, opt_state, key, steps: int) -> tuple[object, list[float], float]:
    """Run ``step(params, opt_state, key_i)`` ``steps`` times: (params, the loss every 100 steps, seconds)."""
    t_train = time.time()
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        if i % 100 == 0 or i == steps - 1:
            losses.append(round(float(loss), 4))
            print(f"step {i:5d} loss {float(loss):.4f}  ({time.time() - t_train:.0f}s)", flush=True)
    return params, losses, time.time() - t_train


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=24000)
    ap.add_argument("--held-out-images", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = ap.parse_args(argv)

    t0 = time.time()
    pipe = sdjax.load()
    scale = float(pipe.vae.config.scaling_factor)
    ac = alphas_cumprod(pipe.scheduler)
    log_sigmas = jnp.asarray(np.log(((1 - ac) / ac) ** 0.5), jnp.float32)
    n_train = pipe.scheduler.num_train_timesteps
    data = shapes.make_batch(args.seed * 1000 + 11, args.train_images)
    held_out = shapes.make_batch(args.seed * 1000 + 12, args.held_out_images)
    means, logvars = encode(pipe, data.images)
    ho_means, ho_logvars = encode(pipe, held_out.images)
    h, w, c = means.shape[1:]
    config = LatentClassifierConfig(latent_size=h, latent_channels=c, num_train_timesteps=n_train)
    print(f"data: {len(means)} latents {means.shape[1:]} encoded in {time.time() - t0:.1f}s", flush=True)

    train_means, train_logvars, train_labels = map(jnp.asarray, (means, logvars, data.labels))
    params = init_params(jax.random.key(args.seed), config)
    print(f"params: {sum(x.size for x in jax.tree.leaves(params))}", flush=True)
    warmup = min(100, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr / 100)
    opt = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = opt.init(params)

    def loss_fn(params, x, t, labels):
        logits = latent_logits(params, config, x, t)
        return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[:, i]).mean()
                   for i, k in enumerate(HEADS))

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k_t, k_noise = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, train_means.shape[0])
        t = jax.random.uniform(k_t, (args.batch_size,), maxval=n_train - 1)
        x = noised(train_means[idx], train_logvars[idx], scale, abar_at(log_sigmas, t), k_noise)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, t, train_labels[idx])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, losses, train_s = train(step, params, opt_state, jax.random.key(args.seed + 1), args.steps)

    # Evaluate the weights as shipped (float16).
    shipped = jax.tree.map(lambda p: jnp.asarray(p, jnp.float16).astype(jnp.float32), params)
    table = accuracy_table(shipped, config, ho_means, ho_logvars, held_out.labels, scale, ac, jax.random.key(99))
    print("held-out accuracy (t: " + ", ".join(HEADS) + ")")
    for t, row in table.items():
        print(f"  t={t:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    log = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "train_images": args.train_images, "final_loss": losses[-1], "loss_every_100": losses,
           "held_out_accuracy": {str(t): row for t, row in table.items()}, "train_s": round(train_s, 1),
           "wall_time_s": round(time.time() - t0, 1), "jax": jax.__version__}
    save_latent_classifier(params, config, args.out, extra={"training": log})
    print(json.dumps({k: v for k, v in log.items() if k != "loss_every_100"}, indent=2))
    print(f"saved to {args.out}")
    return log


if __name__ == "__main__":
    main()
