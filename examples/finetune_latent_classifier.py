"""Fine-tune the noise-aware latent classifier on the default model's own samples, labelled by the shipped
pixel classifier, so that the two agree where classifier guidance takes the latents.

    python examples/finetune_latent_classifier.py [--rounds 1] [--train-steps 800] [--out FOLDER]

The synthetic shapes the latent classifier was trained on (``examples/train_latent_classifier.py``) are sharp;
the default model draws rounded shapes, and under guidance it is pushed to latents the latent classifier calls
a square while the decoded picture is not one to the pixel judge. So: sample the default model with the empty
prompt, unguided and guided towards each shape by the current latent classifier (algorithm 2 with ``ddim``
at two scales, algorithm 1 with ``ddpm``), decode, label every sample by the pixel classifier, and fine-tune on noised
versions of those final latents (with the judge's labels, all three heads) mixed half and half with fresh
synthetic data (true labels), from the shipped weights. Seeds start at ``--seed-start`` (default 1000), away
from the seeds the classifier-guidance test uses (0-191). Fixed seeds; prints the agreement before and after.
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
from sdjax import classifier
from sdjax import guidance as g
from sdjax.classifier import HEADS
from sdjax.data import shapes
from sdjax.latent_classifier import (
    DEFAULT_PATH,
    batch_log_prob_fn,
    latent_logits,
    load_latent_classifier,
    save_latent_classifier,
)
from sdjax.samplers.schedules import alphas_cumprod

# train_latent_classifier's helpers (examples/ is not a package: loaded by path)
_spec = __import__("importlib.util").util.spec_from_file_location(
    "train_latent_classifier", Path(__file__).with_name("train_latent_classifier.py"))
tlc = __import__("importlib.util").util.module_from_spec(_spec)
_spec.loader.exec_module(tlc)


def model_samples(pipe, params, config, seed: int, per_target: int, scales: list[float], steps: int,
                  cache: Path | None = None, log=print) -> np.ndarray:
    """Final latents (N, h, w, C), scaled as the UNet sees them: unguided (ddim) and guided towards each shape
    (ddim, algorithm 2, with each scale in ``scales``; ddpm, algorithm 1, at 8). Each run is kept in ``cache``
    (a folder) as it finishes, and reused."""
    n_shapes = len(HEADS["shape"])
    batch = per_target * n_shapes
    targets = np.repeat(np.arange(n_shapes), per_target)
    lp = batch_log_prob_fn([("shape", HEADS["shape"][i]) for i in targets], params=params, config=config)
    runs = [("ddim", g.Conditional()),
            ("ddim", g.ClassifierGuidance(lp, np.asarray(scales, np.float32), algorithm=2)),
            ("ddpm", g.ClassifierGuidance(lp, 8.0, algorithm=1))]
    out = []
    for k, (sampler, method) in enumerate(runs):
        path = None if cache is None else cache / f"run{k}-{sampler}-{seed}-{per_target}.npy"
        if path is not None and path.is_file():
            out.append(np.load(path))
            continue
        t0 = time.time()
        lat = pipe.text_to_image([""] * batch, guidance=method, sampler=sampler, num_steps=steps,
                                 seed=seed + k * batch, output="latent")
        lat = np.asarray(lat).reshape((-1,) + lat.shape[-3:]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, lat)
        out.append(lat)
        log(f"  {sampler} {type(method).__name__}: {len(lat)} latents in {time.time() - t0:.0f}s")
    return np.concatenate(out)


def decode(pipe, latents: np.ndarray, batch: int = 256) -> np.ndarray:
    from sdjax.generation.host import decode as host_decode

    return np.concatenate([host_decode(pipe, jnp.asarray(latents[i:i + batch]), "np")
                           for i in range(0, len(latents), batch)])


def agreement(params, config, latents, labels, t: float = 0.0) -> dict[str, float]:
    logits = jax.jit(lambda p, x: latent_logits(p, config, x, jnp.full((x.shape[0],), t, jnp.float32)))(
        params, jnp.asarray(latents))
    return {k: round(float(np.mean(np.argmax(np.asarray(logits[k]), -1) == labels[:, i])), 4)
            for i, k in enumerate(HEADS)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="sampling rounds (each: 3 runs, see model_samples)")
    ap.add_argument("--per-target", type=int, default=32)
    ap.add_argument("--scales", default="8,16", help="algorithm-2 scales of the guided samples")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--seed-start", type=int, default=1000)
    ap.add_argument("--synthetic-images", type=int, default=3000)
    ap.add_argument("--train-steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--samples-cache", type=Path, help="folder keeping the sampled latents (reused when present)")
    ap.add_argument("--base", type=Path, default=None,
                    help="weights to start from (default: the shipped ones, which are already fine-tuned: to remake "
                         "them, run train_latent_classifier.py --out BASE first and pass --base BASE)")
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = ap.parse_args(argv)

    t_start = time.time()
    pipe = sdjax.load()
    params, config = load_latent_classifier(args.base)
    judge, judge_config = classifier.load_classifier()
    scales = [float(s) for s in args.scales.split(",")]
    parts = [model_samples(pipe, params, config, args.seed_start + r * 100_000, args.per_target, scales,
                           args.steps, cache=args.samples_cache, log=lambda m: print(m, flush=True))
             for r in range(args.rounds)]
    latents = np.concatenate(parts)
    labels = classifier.predict(judge, decode(pipe, latents), judge_config)
    sample_s = time.time() - t_start
    print(f"samples: {len(latents)} in {sample_s:.0f}s; judge's shape counts {np.bincount(labels[:, 0], minlength=3)}",
          flush=True)
    before = agreement(params, config, latents, labels)
    print(f"latent classifier vs judge on these samples at t=0, before: {before}", flush=True)

    # held-out split of the model's samples (every 8th), to report agreement on samples not trained on
    held = np.arange(len(latents)) % 8 == 0
    train_lat, train_lab = jnp.asarray(latents[~held]), jnp.asarray(labels[~held])

    scale = float(pipe.vae.config.scaling_factor)
    ac = alphas_cumprod(pipe.scheduler)
    log_sigmas = jnp.asarray(np.log(((1 - ac) / ac) ** 0.5), jnp.float32)
    n_train = pipe.scheduler.num_train_timesteps
    data = shapes.make_batch(77_000 + args.seed_start, args.synthetic_images)
    means, logvars = (jnp.asarray(a) for a in tlc.encode(pipe, data.images))
    syn_labels = jnp.asarray(data.labels)

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, max(args.train_steps, 51), args.lr / 20)
    opt = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = opt.init(params)
    half = args.batch_size // 2

    def loss_fn(p, x, t, y):
        logits = latent_logits(p, config, x, t)
        return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], y[:, i]).mean()
                   for i, k in enumerate(HEADS))

    @jax.jit
    def step(p, opt_state, key):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        i_m = jax.random.randint(k1, (half,), 0, train_lat.shape[0])
        i_s = jax.random.randint(k2, (half,), 0, means.shape[0])
        t = jax.random.uniform(k3, (2 * half,), maxval=n_train - 1)
        abar = tlc.abar_at(log_sigmas, t)
        a = abar[:half, None, None, None]
        x_model = jnp.sqrt(a) * train_lat[i_m] + jnp.sqrt(1 - a) * jax.random.normal(k4, train_lat[i_m].shape)
        x_syn = tlc.noised(means[i_s], logvars[i_s], scale, abar[half:], k5)
        x = jnp.concatenate([x_model, x_syn])
        y = jnp.concatenate([train_lab[i_m], syn_labels[i_s]])
        loss, grads = jax.value_and_grad(loss_fn)(p, x, t, y)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    params, losses, train_s = tlc.train(step, params, opt_state, jax.random.key(args.seed_start + 5), args.train_steps)

    shipped = jax.tree.map(lambda p: jnp.asarray(p, jnp.float16).astype(jnp.float32), params)
    after = {str(t): agreement(shipped, config, latents[held], labels[held], t) for t in (0.0, 250.0, 500.0)}
    print(f"held-out model samples, agreement with the judge after (t: heads): {after}", flush=True)
    check = shapes.make_batch(78_000, 1000)
    table = tlc.accuracy_table(shipped, config, *tlc.encode(pipe, check.images), check.labels, scale, ac,
                               jax.random.key(99))
    print(f"synthetic held-out accuracy: {table}", flush=True)
    old = json.loads(((args.base or DEFAULT_PATH) / "config.json").read_text()).get("training", {})
    old.pop("finetune", None)
    log = {**old, "finetune": {"model_samples": int(len(latents)), "seed_start": args.seed_start, "rounds": args.rounds,
                        "scales": args.scales, "train_steps": args.train_steps, "lr": args.lr,
                        "synthetic_images": args.synthetic_images, "agreement_before_t0": before,
                        "held_out_agreement_after": after, "synthetic_held_out_accuracy": table,
                        "loss_every_100": losses, "sample_s": round(sample_s, 1), "train_s": round(train_s, 1),
                        "wall_time_s": round(time.time() - t_start, 1)}}
    save_latent_classifier(params, config, args.out, extra={"training": log})
    print(f"saved to {args.out} ({time.time() - t_start:.0f}s)")
    return log


if __name__ == "__main__":
    main()
