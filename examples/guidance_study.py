"""Guidance on ground truth: sweep classifier-free guidance scale, scale schedules and guidance intervals on
the testbed's Gaussian mixtures, measure precision / recall / diversity / distance to the true conditional,
and draw the plots.

    python examples/guidance_study.py                 # writes docs/guidance_testbed.png and .md (the tables)
    python examples/guidance_study.py --out /tmp/x.png --samples 4096

Two models of the same 2-D data (``testbed.blobs_2d``, three overlapping classes):
- exact: both passes are the exact denoisers, so scale 1 samples the true conditional;
- imperfect: the conditional pass denoises the data blurred by 0.15 and the unconditional one by 0.4: a
  conditional model that under-fits a little and an unconditional one that under-fits more, the situation in
  which Karras et al. 2024 explain why CFG raises precision.
Every setting is one compiled sweep over the scales (same noise for each scale). Needs matplotlib
(``pip install sdjax[study]``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import guidance
from sdjax.guidance import testbed as tb
from sdjax.samplers import make_schedule, sample

SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
INTERVAL = (0.2, 2.0)  # sigma range (k-diffusion sigma; the data's std is about 1) where guidance is applied
SAMPLER, STEPS = "dpmpp_2m", 30

# each setting maps the (K,) scales to a swept method; the schedules have mean value ``scale`` over the run
SETTINGS: dict[str, Callable[[np.ndarray], guidance.Method]] = {
    "CFG": lambda s: guidance.CFG(s),
    f"CFG, sigma in {INTERVAL}": lambda s: guidance.Interval(guidance.CFG(s), *INTERVAL),
    "CFG, linear schedule": lambda s: guidance.CFG(guidance.Linear(s)),
    "CFG, cosine schedule": lambda s: guidance.CFG(guidance.Cosine(s)),
}


def guided_sampler(gm: tb.GaussianMixture, labels: jax.Array, key: jax.Array, *, diagnostics: bool = False,
                   **mixtures: tb.GaussianMixture) -> Callable[[guidance.Method], jax.Array]:
    """``run(method)`` -> samples (N, D), or (K, N, D) for a method swept over K values, on the same noise
    for every k (one compile per kind of method)."""
    sched = make_schedule(tb.CONFIG, SAMPLER, STEPS)
    x = jax.random.normal(key, (labels.shape[0], gm.dim)) * sched.init_noise_sigma
    fn = tb.model_fn(gm, labels, tb.CONFIG, **mixtures)

    @jax.jit
    def run(method: guidance.Method) -> jax.Array:
        one = lambda m: sample(fn, x, sched, guidance=m, diagnostics=diagnostics)  # noqa: E731
        if guidance.sweep_size(method) is None:
            return one(method)
        return jax.vmap(one, in_axes=(guidance.sweep_axes(method),))(method)

    return run


def sweep(gm: tb.GaussianMixture, n: int, label: int, setting: Callable[[np.ndarray], guidance.Method],
          **mixtures: tb.GaussianMixture) -> list[dict[str, float]]:
    run = guided_sampler(gm, jnp.full(n, label), jax.random.key(0), **mixtures)
    samples = run(setting(np.asarray(SCALES, np.float32)))
    return [tb.evaluate(gm, s, label, jax.random.key(1)) for s in samples]


def table(title: str, rows: dict[str, list[dict[str, float]]]) -> str:
    keys = ("precision", "accuracy", "recall", "coverage", "diversity", "sliced_w2")
    lines = [f"### {title}", "", "| setting | scale | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for name, ms in rows.items():
        for s, m in zip(SCALES, ms, strict=True):
            lines.append(f"| {name} | {s:g} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


COLORS = {name: c for name, c in zip(SETTINGS, ("tab:red", "tab:purple", "tab:blue", "tab:green"), strict=True)}
MODEL_STYLES = {"imperfect": "-", "exact": "--"}


def plot(gm: tb.GaussianMixture, n: int, curves: dict[tuple[str, str], list[dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imperfect = {"cond": tb.smoothed(gm, 0.15), "uncond": tb.smoothed(gm, 0.4)}
    labels = jnp.arange(n) % gm.num_classes
    shown = np.asarray([1.0, 2.0, 4.0, 8.0], np.float32)
    samples = guided_sampler(gm, labels, jax.random.key(0), **imperfect)(guidance.CFG(shown))

    fig = plt.figure(figsize=(12.5, 6.0), dpi=80)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 0.95))
    axis = np.linspace(-3.2, 3.2, 160)
    xx, yy = np.meshgrid(axis, axis)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    colors = ("tab:blue", "tab:orange", "tab:green")
    truth = np.asarray(tb.sample_true(gm, jax.random.key(2), labels))
    panels = [("truth", truth)] + [(f"CFG scale {s:g}", np.asarray(x)) for s, x in zip(shown, samples, strict=True)]
    for ax, (title, xs) in zip(top.subplots(1, len(panels)), panels, strict=True):
        for c in range(gm.num_classes):
            # the 95 % highest-density region of each class: precision counts the samples inside it
            logp = np.asarray(tb.log_prob(gm, pts, jnp.full(pts.shape[0], c))).reshape(xx.shape)
            level = float(tb.density_threshold(gm, c, jax.random.key(3)))
            ax.contour(xx, yy, logp, levels=[level], colors=colors[c], linewidths=0.8, linestyles="solid")
            sel = np.asarray(labels) == c
            ax.scatter(xs[sel, 0], xs[sel, 1], s=1.5, c=colors[c], alpha=0.5, linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-3.2, 3.2), ax.set_ylim(-3.2, 3.2), ax.set_xticks([]), ax.set_yticks([])
        ax.set_aspect("equal")
    top.suptitle(f"Imperfect model, three classes (lines: each class's 95 % highest-density region); {SAMPLER}, "
                 f"{STEPS} steps", fontsize=10)
    top.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.04)

    axes = bottom.subplots(1, 4)
    for ax, (key, title) in zip(axes[:2], [("precision", "precision (in 95 % HDR)"),
                                           ("diversity", "diversity (/ truth)")], strict=True):
        for (model, setting), ms in curves.items():
            ax.plot(SCALES, [m[key] for m in ms], MODEL_STYLES[model], color=COLORS[setting], marker=".",
                    label=f"{model}: {setting}")
        ax.set_xlabel("CFG scale (schedules: mean)"), ax.set_title(title, fontsize=10), ax.grid(alpha=0.3)
    ax = axes[2]
    for (model, setting), ms in curves.items():
        ax.plot([m["diversity"] for m in ms], [m["precision"] for m in ms], MODEL_STYLES[model],
                color=COLORS[setting], marker=".")
    ax.set_xlabel("diversity"), ax.set_ylabel("precision"), ax.grid(alpha=0.3)
    ax.set_ylim(0.9, 1.005)
    ax.set_title("trade-off (scale 1 → 8)", fontsize=10)

    # per-step diagnostics: the guidance term |guided - cond| in epsilon units, at mean scale 3
    ax = axes[3]
    run = guided_sampler(gm, jnp.zeros(n, jnp.int32), jax.random.key(0), diagnostics=True, **imperfect)
    sigmas = np.asarray(make_schedule(tb.CONFIG, SAMPLER, STEPS).sigmas[:-1])
    for setting, method in SETTINGS.items():
        _, diag = run(method(np.float32(3.0)))
        ax.plot(sigmas, np.asarray(diag["guidance_norm"]).mean(axis=-1), color=COLORS[setting], marker=".",
                ms=3)
    ax.set_xscale("log"), ax.invert_xaxis(), ax.grid(alpha=0.3)
    ax.set_xlabel("sigma (sampling runs right)"), ax.set_title("guidance term norm, scale 3", fontsize=10)

    bottom.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    bottom.suptitle(f"Class 0, {n} samples: imperfect (solid) and exact (dashed) models", fontsize=10)
    bottom.subplots_adjust(left=0.05, right=0.98, bottom=0.3, top=0.84, wspace=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "guidance_testbed.png")
    p.add_argument("--samples", type=int, default=2048)
    args = p.parse_args()

    gm = tb.blobs_2d()
    models = {"imperfect": {"cond": tb.smoothed(gm, 0.15), "uncond": tb.smoothed(gm, 0.4)}, "exact": {}}
    curves = {(model, name): sweep(gm, args.samples, 0, setting, **mixtures)
              for model, mixtures in models.items() for name, setting in SETTINGS.items()}
    high = tb.random_mixture(0, 16)
    high_imperfect = {"cond": tb.smoothed(high, 0.1), "uncond": tb.smoothed(high, 0.3)}
    tables = [
        table("2-D blobs, class 0", {f"{m}: {s}": v for (m, s), v in curves.items()}),
        table("16-D random mixture, class 0, imperfect model",
              {name: sweep(high, args.samples, 0, setting, **high_imperfect) for name, setting in SETTINGS.items()}),
    ]
    text = "\n\n".join(tables)
    print(text)
    header = (f"# Guidance on the Gaussian-mixture testbed\n\nWritten by `examples/guidance_study.py` ({SAMPLER}, "
              f"{STEPS} steps, {args.samples} samples); metrics as `sdjax.guidance.testbed.evaluate`.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(header + text + "\n")
    plot(gm, args.samples, curves, args.out)


if __name__ == "__main__":
    main()
