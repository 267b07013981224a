"""Scratch experiment (not part of the library): classifier guidance with the shipped latent classifier on the
default model, written outside the sampler core, to size the scale the core's ClassifierGuidance will use.

    python examples/scratch_cg.py [--scales 0.5,1,2,4] [--algorithm 2] [--seed 0] [--n 64] [--steps 20]

Algorithm 2 (Dhariwal & Nichol 2021), DDIM: the sampler gets ``eps_hat = eps - sqrt(1 - abar_t) * s *
grad_x log p(y | x_t, t)``. Algorithm 1, DDPM ("fixed_small"): the posterior mean is shifted by
``s * variance * grad`` at the step's x_t. Empty prompt, no classifier-free guidance. Each image is judged by
the shipped pixel classifier (``sdjax.classifier``) and the share of the target class is printed per target,
unguided and at each scale.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import sdjax
from sdjax import classifier, text
from sdjax.classifier import HEADS
from sdjax.generate import _decoder
from sdjax.latent_classifier import latent_logits, load_latent_classifier
from sdjax.samplers import make_schedule, sample
from sdjax.samplers.schedules import alphas_cumprod

TARGETS = [(h, v) for h, values in HEADS.items() for v in values]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="0.5,1,2,4")
    ap.add_argument("--algorithm", type=int, default=2, choices=(1, 2))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--classifier", default=None, help="latent classifier folder (default: the shipped one)")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--save", default=None, help="write the first 32 images of each run to SAVE_s{scale}.png")
    ap.add_argument("--targets", default="all", help="comma list like shape=triangle,color=red or 'all'")
    args = ap.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    targets = TARGETS if args.targets == "all" else [tuple(t.split("=")) for t in args.targets.split(",")]

    pipe = sdjax.load()
    n = args.n
    encoders = [(name, enc.module) for name, enc in pipe.text_encoders.items()]
    ids = {name: jnp.asarray(text.token_ids(pipe, [""] * n, name)) for name in pipe.text_encoders}
    context = text.encode_modules(pipe.is_sdxl, encoders, pipe.params, ids, None)[0]
    sampler = "ddim" if args.algorithm == 2 else "ddpm"
    schedule = make_schedule(pipe.scheduler, sampler, args.steps)
    ac = jnp.asarray(alphas_cumprod(pipe.scheduler))
    lc_params, lc_config = load_latent_classifier(args.classifier)
    pix_params, pix_config = classifier.load_classifier()
    decode = _decoder(pipe.vae)
    sizes = [len(v) for v in HEADS.values()]

    def log_prob(x, t, weights):
        logits = latent_logits(lc_params, lc_config, x, t)
        lps = jnp.concatenate([jax.nn.log_softmax(logits[h], -1) for h in HEADS], -1)
        return lps @ weights

    def eps_fn(x_in, t):
        ts = jnp.broadcast_to(t, (x_in.shape[0],))
        return pipe.unet.apply({"params": pipe.params["unet"]}, x_in.astype(pipe.unet.dtype), ts,
                               context).astype(jnp.float32)

    def grad_fn(x_in, t, weights):
        return jax.grad(lambda x: log_prob(x, t, weights).sum())(x_in)

    @jax.jit
    def run_alg2(noise, weights, scale):
        def model_fn(x_in, t):
            abar = ac[jnp.asarray(t, jnp.int32)]
            return eps_fn(x_in, t) - jnp.sqrt(1 - abar) * scale * grad_fn(x_in, t, weights)

        latents = sample(model_fn, noise, schedule)
        return decode(pipe.params["vae"], latents), latents

    @jax.jit
    def run_alg1(noise, weights, scale, key):
        a_all, ap_all, ts = map(jnp.asarray, (schedule.extra["alphas"], schedule.extra["alphas_prev"],
                                              schedule.timesteps))

        def body(i, x):
            a, a_prev, t = a_all[i], ap_all[i], jnp.asarray(ts[i], jnp.float32)
            eps = eps_fn(x, t)
            x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
            beta = 1 - a / a_prev
            mean = jnp.sqrt(a_prev) * beta / (1 - a) * x0 + jnp.sqrt(a / a_prev) * (1 - a_prev) / (1 - a) * x
            var = jnp.maximum((1 - a_prev) / (1 - a) * beta, 1e-20)
            mean = mean + scale * var * grad_fn(x, t, weights)
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * z

        latents = jax.lax.fori_loop(0, schedule.num_steps, body, noise)
        return decode(pipe.params["vae"], latents), latents

    noise = jax.random.normal(jax.random.key(args.seed), (n, 8, 8, 4), jnp.float32)
    key = jax.random.key(args.seed + 1000)

    def shares(weights, scale):
        w = jnp.asarray(weights, jnp.float32)
        s = jnp.float32(scale)
        pixels, latents = run_alg2(noise, w, s) if args.algorithm == 2 else run_alg1(noise, w, s, key)
        judged = classifier.predict(pix_params, np.asarray(pixels), pix_config)
        if args.save:
            from PIL import Image

            grid = np.asarray(pixels)[:32].reshape(4, 8, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(256, 512, 3)
            Image.fromarray((grid * 255).round().astype(np.uint8)).save(f"{args.save}_s{scale:g}.png")
        if args.diagnose:  # the latent classifier's own reading of the final latents, and how often it agrees
            logits = latent_logits(lc_params, lc_config, latents, jnp.float32(0))
            own = np.stack([np.argmax(np.asarray(logits[h]), -1) for h in HEADS], -1)

            def counts(labels):
                return [np.bincount(labels[:, i], minlength=len(v)).tolist() for i, v in enumerate(HEADS.values())]

            print(f"  s={scale:g} pixel judge counts per head {counts(judged)}, latent classifier's {counts(own)},"
                  f" agreement {np.mean(own == judged, 0).round(2).tolist()}", flush=True)
        return judged

    t0 = time.time()
    base = shares(np.zeros(sum(sizes)), 0.0)
    print(f"unguided run {time.time() - t0:.1f}s (incl. compile)", flush=True)
    rows = []
    offsets = np.cumsum([0, *sizes])
    for head, value in targets:
        h = list(HEADS).index(head)
        cls = HEADS[head].index(value)
        weights = np.zeros(sum(sizes))
        weights[offsets[h] + cls] = 1.0
        row = {"target": f"{head}={value}", "unguided": float(np.mean(base[:, h] == cls))}
        for s in scales:
            t1 = time.time()
            pred = shares(weights, s)
            row[f"s={s:g}"] = float(np.mean(pred[:, h] == cls))
            row["s_time"] = round(time.time() - t1, 1)
        rows.append(row)
        print(f"{row['target']:20s} unguided {row['unguided']:.2f}  "
              + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("s=")), flush=True)
    print(json.dumps({"algorithm": args.algorithm, "seed": args.seed, "n": n, "steps": args.steps,
                      "rows": rows}))
    return {"rows": rows}


if __name__ == "__main__":
    main()
