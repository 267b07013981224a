"""A guidance testbed with ground truth: class-conditional Gaussian mixtures whose denoisers are exact.

Each class ``c`` is a mixture of Gaussians ``N(mu_ck, diag(v_ck))`` with weights ``w_ck``; the classes have
priors ``pi_c`` and may overlap. Noising ``x_t = a * x0 + s * eps`` keeps every component Gaussian, so the
posterior mean is exact in closed form::

    p(x_t | k)   = N(x_t; a mu_k, a^2 v_k + s^2)                       (per dimension)
    E[x0 | x_t]  = sum_k r_k(x_t) (mu_k + a v_k / (a^2 v_k + s^2) (x_t - a mu_k)),   r_k ∝ w_k p(x_t | k)

with the responsibilities ``r_k`` by log-sum-exp. The conditional denoiser sums over class c's components, the
unconditional one over all components weighted ``pi_c w_ck``. Plugged into ``sdjax.samplers.sample`` as the
model, every sampler and guidance method runs on a problem where the true conditional distribution is known,
so precision, recall, diversity and a distance to the truth can be measured instead of judged by eye::

    gm = testbed.blobs_2d()
    labels = jnp.zeros(512, jnp.int32)
    schedule = make_schedule(testbed.CONFIG, "euler", 20)
    x = jax.random.normal(key, (512, 2)) * schedule.init_noise_sigma
    out = sample(testbed.model_fn(gm, labels, testbed.CONFIG), x, schedule, guidance=guidance.CFG(3.0))
    testbed.evaluate(gm, out, 0, key)  # {"precision": ..., "recall": ..., "sliced_w2": ..., ...}

The model sees what the UNet sees, ``x_in`` in variance-preserving form and the timestep ``t``; it recovers
the noise level from ``t`` as diffusers places fractional timesteps (linear interpolation in log sigma over
the training sigmas). That is exact wherever the sampler evaluates at a training timestep or at a sigma whose
timestep diffusers interpolates (every sampler with "default" sigmas, and the sigma-space samplers with
Karras / exponential sigmas). DPM-Solver / UniPC / DPM2 with Karras sigmas round the timestep, so the model
sees a slightly different noise level than the latent has, as a real UNet does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.samplers.schedules import SchedulerConfig, alphas_cumprod, train_sigmas

# DDPM's linear betas (diffusers' defaults, written out: samplers fill omitted betas differently) with
# "trailing" spacing, so every sampler starts at the last training timestep. Its terminal alpha-bar is 4e-5:
# the pure-noise start differs from the true noised marginal by less than 1 % of the data's scale.
CONFIG = SchedulerConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", timestep_spacing="trailing",
                         clip_sample=False, set_alpha_to_one=True)


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """C classes of K diagonal Gaussians each in D dimensions (a pytree of arrays).

    ``means`` (C, K, D); ``variances`` (C, K, D); ``log_weights`` (C, K), normalised per class (a class with
    fewer components pads with -inf); ``log_priors`` (C,), normalised.
    """

    means: jax.Array
    variances: jax.Array
    log_weights: jax.Array
    log_priors: jax.Array

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])


jax.tree_util.register_dataclass(
    GaussianMixture, data_fields=["means", "variances", "log_weights", "log_priors"], meta_fields=[])


def mixture(means: Sequence, stds: Sequence | float, weights: Sequence | None = None,
            priors: Sequence | None = None) -> GaussianMixture:
    """Build a mixture from per-class lists: ``means[c]`` is (K_c, D); ``stds[c]`` per component, a scalar
    (isotropic) or (D,) (diagonal), or one number for all; ``weights[c]`` (K_c,) and ``priors`` (C,) default
    to uniform. Classes with fewer components are padded with zero-weight components."""
    means = [np.asarray(m, np.float64).reshape(-1, np.shape(m)[-1]) for m in means]
    num_classes, dim = len(means), means[0].shape[1]
    k_max = max(len(m) for m in means)
    if any(m.shape[1] != dim for m in means):
        raise ValueError("mixture: every class's means must have the same dimension")
    if np.isscalar(stds):
        stds = [[stds] * len(m) for m in means]
    if weights is None:
        weights = [np.ones(len(m)) for m in means]
    if len(stds) != num_classes or len(weights) != num_classes:
        raise ValueError(f"mixture: stds and weights need one entry per class ({num_classes})")
    mu = np.zeros((num_classes, k_max, dim))
    var = np.ones((num_classes, k_max, dim))
    logw = np.full((num_classes, k_max), -np.inf)
    for c, m in enumerate(means):
        s = np.broadcast_to(np.asarray(stds[c], np.float64).reshape(len(m), -1), (len(m), dim))
        w = np.asarray(weights[c], np.float64)
        if len(w) != len(m) or (w <= 0).any() or (s <= 0).any():
            raise ValueError(f"mixture: class {c} needs {len(m)} positive weights and stds")
        mu[c, : len(m)], var[c, : len(m)] = m, s**2
        logw[c, : len(m)] = np.log(w / w.sum())
    p = np.ones(num_classes) if priors is None else np.asarray(priors, np.float64)
    if p.shape != (num_classes,) or (p <= 0).any():
        raise ValueError(f"mixture: priors must be {num_classes} positive numbers")
    return GaussianMixture(jnp.asarray(mu, jnp.float32), jnp.asarray(var, jnp.float32),
                           jnp.asarray(logw, jnp.float32), jnp.asarray(np.log(p / p.sum()), jnp.float32))


def blobs_2d() -> GaussianMixture:
    """Three overlapping classes in the plane, latent-sized (data std about 1), for pictures.

    Class 0 (two blobs left), class 1 (two blobs right), class 2 (one wide blob in the middle) overlaps both.
    """
    return mixture(
        means=[[[-1.5, 0.6], [-0.9, -1.1]], [[1.5, 0.6], [0.9, -1.1]], [[0.0, 0.2]]],
        stds=[[0.35, 0.25], [0.35, 0.25], [0.6]],
        weights=[[0.6, 0.4], [0.5, 0.5], [1.0]],
    )


def random_mixture(seed: int, dim: int, num_classes: int = 4, components: int = 3, spread: float = 1.0,
                   std: tuple[float, float] = (0.2, 0.5)) -> GaussianMixture:
    """Random classes in ``dim`` dimensions (numpy's generator with ``seed``): means N(0, 4 spread^2 / dim)
    per coordinate (so the distance between means does not grow with dim), diagonal stds uniform in ``std``,
    Dirichlet(2) weights."""
    rng = np.random.default_rng(seed)
    mu = spread * rng.normal(size=(num_classes, components, dim)) * math.sqrt(4.0 / dim)
    s = rng.uniform(std[0], std[1], size=(num_classes, components, dim))
    w = rng.dirichlet(np.full(components, 2.0), size=num_classes)
    return mixture(mu, list(s), list(w))


# --- densities and exact denoisers ------------------------------------------------------------------------


def _components(gm: GaussianMixture, labels: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-image (means, variances, log weights): (B, K, D), (B, K, D), (B, K) for class labels, or all
    C*K components (broadcast over the batch) weighted by the class priors when ``labels`` is None."""
    if labels is None:
        logw = (gm.log_weights + gm.log_priors[:, None]).reshape(1, -1)
        return gm.means.reshape(1, -1, gm.dim), gm.variances.reshape(1, -1, gm.dim), logw
    labels = jnp.asarray(labels, jnp.int32)
    return gm.means[labels], gm.variances[labels], gm.log_weights[labels]


def _log_normal(x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """log N(x; mean, diag(var)) summed over the last axis; x (B, 1, D) against (B|1, K, D) -> (B, K)."""
    return -0.5 * jnp.sum((x - mean) ** 2 / var + jnp.log(2 * jnp.pi * var), axis=-1)


def log_prob(gm: GaussianMixture, x: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """log p(x | c) per image (B,), or the marginal log p(x) when ``labels`` is None. ``x``: (B, D)."""
    mu, var, logw = _components(gm, labels)
    return jax.nn.logsumexp(logw + _log_normal(x[:, None], mu, var), axis=-1)


def class_log_posterior(gm: GaussianMixture, x: jax.Array) -> jax.Array:
    """log p(c | x): (B, C), the Bayes classifier of the mixture."""
    joint = jnp.stack([log_prob(gm, x, jnp.full(x.shape[0], c)) for c in range(gm.num_classes)], axis=-1)
    joint = joint + gm.log_priors
    return joint - jax.nn.logsumexp(joint, axis=-1, keepdims=True)


def posterior_mean(gm: GaussianMixture, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
                   labels: jax.Array | None = None) -> jax.Array:
    """E[x0 | x_t, c] (or E[x0 | x_t] when ``labels`` is None) for ``x_t = alpha * x0 + sigma * eps``.

    ``x_t`` (B, D); ``alpha``, ``sigma`` scalars or (B,). Exact: responsibilities of the noised components
    by log-sum-exp, each component's Gaussian posterior mean. Works at alpha = 0 and at sigma -> 0 (returns
    x_t / alpha).
    """
    mu, var, logw = _components(gm, labels)
    a = jnp.reshape(jnp.asarray(alpha, jnp.float32), (-1, 1, 1))
    s = jnp.reshape(jnp.asarray(sigma, jnp.float32), (-1, 1, 1))
    x = x_t[:, None]
    noised_var = a**2 * var + s**2
    resp = jax.nn.softmax(logw + _log_normal(x, a * mu, noised_var), axis=-1)
    means = mu + a * var / noised_var * (x - a * mu)
    return jnp.einsum("bk,bkd->bd", resp, means)


def model_output(gm: GaussianMixture, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
                 labels: jax.Array | None = None, prediction_type: str = "epsilon") -> jax.Array:
    """The exact denoiser as a model would output it: epsilon ``(x_t - alpha x0) / sigma``, v
    ``alpha eps - sigma x0``, or x0 ("sample")."""
    x0 = posterior_mean(gm, x_t, alpha, sigma, labels)
    if prediction_type == "sample":
        return x0
    a = jnp.reshape(jnp.asarray(alpha, jnp.float32), (-1, 1))
    s = jnp.reshape(jnp.asarray(sigma, jnp.float32), (-1, 1))
    eps = (x_t - a * x0) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction, sample")


# --- the model the sampling loop calls --------------------------------------------------------------------


def noise_level(config: SchedulerConfig) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``t -> (alpha, sigma)`` of the variance-preserving input the UNet sees at (fractional) timestep t.

    Fractional timesteps are placed as diffusers' ``_sigma_to_t`` places them (linear in log sigma), so this
    inverts it exactly. The config's betas must be explicit: samplers fill omitted betas differently.
    """
    if config.trained_betas is None and None in (config.beta_start, config.beta_end, config.beta_schedule):
        raise ValueError("noise_level: set the config's beta_start, beta_end and beta_schedule explicitly "
                         "(diffusers' schedulers fill omitted betas differently), e.g. testbed.CONFIG")
    log_sigmas = jnp.asarray(np.log(train_sigmas(alphas_cumprod(config, clamp_zero_snr=True))), jnp.float32)
    grid = jnp.arange(log_sigmas.shape[0], dtype=jnp.float32)

    def level(t: jax.Array) -> tuple[jax.Array, jax.Array]:
        sigma = jnp.exp(jnp.interp(jnp.asarray(t, jnp.float32), grid, log_sigmas))
        alpha = 1 / jnp.sqrt(sigma**2 + 1)
        return alpha, sigma * alpha

    return level


# "empty" (the always-empty prompt of some methods) is the unconditional model here too
PASSES = ("cond", "uncond", "empty")


def smoothed(gm: GaussianMixture, std: float) -> GaussianMixture:
    """``gm`` convolved with N(0, std^2 I): the exact denoiser of a blurrier distribution, a stand-in for a
    trained model that under-fits (samples too spread, mass between the modes)."""
    return dataclasses.replace(gm, variances=gm.variances + jnp.float32(std) ** 2)


def model_fn(gm: GaussianMixture, labels: jax.Array, config: SchedulerConfig, *,
             cond: GaussianMixture | None = None, uncond: GaussianMixture | None = None) -> Callable:
    """``model_fn(x_in, t, passes) -> {pass: output}`` for ``sample(..., guidance=...)``, outputs in the
    config's prediction_type; ``labels`` (B,) int, one class per image.

    "cond" is the exact denoiser of image b's class ``labels[b]``, "uncond" and "empty" the marginal one.
    ``cond`` / ``uncond`` replace the mixture a pass denoises (default ``gm``, i.e. an exact model): e.g.
    ``uncond=smoothed(gm, 0.4)`` models an unconditional model that fits worse than the conditional one,
    which is how Karras et al. 2024 ("Guiding a diffusion model with a bad version of itself") explain why
    CFG raises precision in practice.
    """
    level = noise_level(config)
    labels = jnp.asarray(labels, jnp.int32)
    pred = config.prediction_type
    uncond = gm if uncond is None else uncond
    mixtures = {"cond": gm if cond is None else cond, "uncond": uncond, "empty": uncond}

    def fn(x_in: jax.Array, t: jax.Array, passes: Sequence[str]) -> dict[str, jax.Array]:
        unknown = [p for p in passes if p not in PASSES]
        if unknown:
            raise ValueError(f"testbed model: unknown passes {unknown}; it has {', '.join(PASSES)}")
        alpha, sigma = level(t)
        x = x_in.reshape(x_in.shape[0], -1)
        out = {p: model_output(mixtures[p], x, alpha, sigma, labels if p == "cond" else None, pred)
               for p in passes}
        return {p: v.reshape(x_in.shape) for p, v in out.items()}

    return fn


def cfg_model_fn(gm: GaussianMixture, labels: jax.Array, config: SchedulerConfig, scale: float | jax.Array,
                 interval: tuple[float, float] | None = None, **mixtures: GaussianMixture
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The single-output form ``model_fn(x_in, t)`` with classifier-free guidance applied inside
    (``uncond + scale * (cond - uncond)`` on the raw outputs), a reference for the loop's guidance methods.

    ``interval=(sigma_min, sigma_max)``: guide only where the evaluated sigma (k-diffusion's, recovered
    from t) lies in (sigma_min, sigma_max], the conditional output elsewhere (Kynkäänniemi et al. 2024).
    ``mixtures``: ``cond=`` / ``uncond=`` as :func:`model_fn`.
    """
    fn = model_fn(gm, labels, config, **mixtures)
    level = noise_level(config)

    def combined(x_in: jax.Array, t: jax.Array) -> jax.Array:
        out = fn(x_in, t, ("cond", "uncond"))
        w = jnp.asarray(scale, jnp.float32)
        if interval is not None:
            alpha, sigma_t = level(t)
            sigma = sigma_t / alpha
            w = jnp.where((sigma > interval[0]) & (sigma <= interval[1]), w, 1.0)
        return out["uncond"] + w * (out["cond"] - out["uncond"])

    return combined


# --- ground truth and metrics ------------------------------------------------------------------------------


@jax.jit
def sample_true(gm: GaussianMixture, key: jax.Array, labels: jax.Array) -> jax.Array:
    """Exact samples of p(x0 | c) for each label (B,) -> (B, D)."""
    labels = jnp.asarray(labels, jnp.int32)
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, gm.log_weights[labels])
    mu, var = gm.means[labels, comp], gm.variances[labels, comp]
    return mu + jnp.sqrt(var) * jax.random.normal(k_noise, mu.shape)


def density_threshold(gm: GaussianMixture, label: int, key: jax.Array, q: float = 0.05, n: int = 20000
                      ) -> jax.Array:
    """The q-quantile of log p(x | c) under x ~ p(. | c): its superlevel set is the class's smallest region
    holding 1 - q of its mass (Monte Carlo with n samples)."""
    x = sample_true(gm, key, jnp.full(n, label))
    return jnp.quantile(log_prob(gm, x, jnp.full(n, label)), q)


def precision(gm: GaussianMixture, x: jax.Array, label: int, threshold: jax.Array) -> jax.Array:
    """Share of samples inside class ``label``'s high-density region (log p(x | c) >= threshold); a true
    sample scores 1 - q on average."""
    return jnp.mean(log_prob(gm, x, jnp.full(x.shape[0], label)) >= threshold)


def class_accuracy(gm: GaussianMixture, x: jax.Array, label: int) -> jax.Array:
    """Share of samples the mixture's Bayes classifier assigns to ``label`` (what a perfect classifier scores)."""
    return jnp.mean(jnp.argmax(class_log_posterior(gm, x), axis=-1) == label)


def _pairwise(a: jax.Array, b: jax.Array) -> jax.Array:
    d2 = jnp.sum(a**2, -1)[:, None] + jnp.sum(b**2, -1)[None, :] - 2 * a @ b.T
    return jnp.sqrt(jnp.maximum(d2, 0.0))


def knn_recall(real: jax.Array, fake: jax.Array, k: int = 3) -> jax.Array:
    """Kynkäänniemi et al. 2019 recall: share of real samples inside the generated manifold, the union of
    balls around each generated sample with the radius to its k-th nearest generated neighbour."""
    radii = jnp.sort(_pairwise(fake, fake), axis=1)[:, k]  # column 0 is the point itself
    return jnp.mean(jnp.any(_pairwise(real, fake) <= radii[None, :], axis=1))


def knn_precision(real: jax.Array, fake: jax.Array, k: int = 3) -> jax.Array:
    """Kynkäänniemi et al. 2019 precision: share of generated samples inside the real manifold."""
    return knn_recall(fake, real, k)


def knn_coverage(real: jax.Array, fake: jax.Array, k: int = 3) -> jax.Array:
    """Naeem et al. 2020 coverage: share of real samples whose k-NN ball (radius to their k-th nearest real
    neighbour) holds at least one generated sample; 1 - 2^-k (0.875 at k = 3) when both sets come from the
    same distribution. Unlike k-NN recall, a few generated outliers with wide balls do not inflate it."""
    radii = jnp.sort(_pairwise(real, real), axis=1)[:, k]
    return jnp.mean(jnp.any(_pairwise(real, fake) <= radii[:, None], axis=1))


def mode_coverage(gm: GaussianMixture, x: jax.Array, label: int, min_share: float = 0.25) -> jax.Array:
    """Share of class ``label``'s components that receive at least ``min_share`` of their expected share of
    the samples (each sample counted for its most responsible component of that class)."""
    mu, var, logw = _components(gm, jnp.full(x.shape[0], label))
    comp = jnp.argmax(logw + _log_normal(x[:, None], mu, var), axis=-1)
    k = gm.log_weights.shape[1]
    counts = jnp.sum(jax.nn.one_hot(comp, k), axis=0) / x.shape[0]
    weights = jnp.exp(gm.log_weights[label])
    present = weights > 0
    return jnp.sum(present & (counts >= min_share * weights)) / jnp.sum(present)


def sliced_wasserstein(x: jax.Array, y: jax.Array, key: jax.Array, num_projections: int = 128) -> jax.Array:
    """Sliced 2-Wasserstein distance (in data units) between two equal-sized sample sets: the root mean
    square, over random unit directions, of the 1-D W2 between the projections (sorted quantiles)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-sized sets, got {x.shape} and {y.shape}")
    dirs = jax.random.normal(key, (x.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    px, py = jnp.sort(x @ dirs, axis=0), jnp.sort(y @ dirs, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))


def diversity(x: jax.Array) -> jax.Array:
    """Mean pairwise Euclidean distance between samples."""
    n = x.shape[0]
    return jnp.sum(_pairwise(x, x)) / (n * (n - 1))


def evaluate(gm: GaussianMixture, x: jax.Array, label: int, key: jax.Array, q: float = 0.05, k: int = 3
             ) -> dict[str, float]:
    """All metrics of samples ``x`` (N, D) meant to come from class ``label``, against N fresh true samples.

    precision: share in the class's (1 - q) highest-density region (truth: 1 - q); accuracy: Bayes-classifier
    share; recall: k-NN recall (Kynkäänniemi 2019); coverage: k-NN coverage (Naeem 2020, truth 0.875);
    modes: share of the class's components that get samples (:func:`mode_coverage`); sliced_w2: sliced
    2-Wasserstein distance to the true conditional (truth: the sampling noise of N samples); diversity: mean pairwise
    distance divided by the true class's (truth: 1).
    """
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    return {name: float(v) for name, v in _evaluate(gm, x, jnp.int32(label), key, jnp.float32(q), k).items()}


@functools.partial(jax.jit, static_argnames=("k",))
def _evaluate(gm: GaussianMixture, x: jax.Array, label: jax.Array, key: jax.Array, q: jax.Array, k: int
              ) -> dict[str, jax.Array]:
    k_thr, k_real, k_proj = jax.random.split(key, 3)
    real = sample_true(gm, k_real, jnp.full(x.shape[0], label))
    threshold = density_threshold(gm, label, k_thr, q)
    return {
        "precision": precision(gm, x, label, threshold),
        "accuracy": class_accuracy(gm, x, label),
        "recall": knn_recall(real, x, k),
        "coverage": knn_coverage(real, x, k),
        "modes": mode_coverage(gm, x, label),
        "sliced_w2": sliced_wasserstein(x, real, k_proj),
        "diversity": diversity(x) / diversity(real),
    }
