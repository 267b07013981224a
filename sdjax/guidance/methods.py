"""Guidance methods: typed pytrees whose kind and structure are static and whose numbers are traced.

A method says which passes it needs (``passes``), carries state through the loop (``init_state``), and
combines the passes' raw outputs into one guided output each step (``combine``). Methods that choose which
passes run (``Interval``) or that differentiate through the model (``ClassifierGuidance`` on x0) override
``evaluate``. Changing a number (a scale, an interval bound, a momentum) never recompiles; changing the kind
of method, or a static field, does.

Any numeric field may be given as a 1-D array of K values (a ``PerStep`` array as (K, num_steps)): the run
becomes a sweep with a leading axis K, every k on the same noise (see :func:`sweep_size`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from sdjax.guidance.context import (
    COND,
    EMPTY,
    UNCOND,
    Guided,
    Predictions,
    RunPasses,
    StepContext,
    check_space,
    cond_parts,
    per_image_norm,
    per_image_sum,
)

Number = Any  # a float, a traced scalar, or (in a sweep) a 1-D array


# --- scale schedules ---------------------------------------------------------------------------------------


@struct.dataclass
class PerStep:
    """One value per step (step 0 the noisiest): ``values`` has shape (num_steps,), or (K, num_steps) in a
    sweep."""

    values: Any
    vector_fields = ("values",)

    def __call__(self, ctx: StepContext) -> jax.Array:
        values = jnp.asarray(self.values, jnp.float32)
        if values.shape[-1] != ctx.num_steps:
            raise ValueError(f"PerStep has {values.shape[-1]} values for a {ctx.num_steps}-step run")
        return values[ctx.step]


@struct.dataclass
class Linear:
    """Increasing linear schedule of Wang et al. 2024 ("Analysis of Classifier-Free Guidance Weight
    Schedulers"): ``2 * scale * p`` with p = 1 - t/T (0 at pure noise), mean ``scale`` over the run."""

    scale: Number

    def __call__(self, ctx: StepContext) -> jax.Array:
        return 2.0 * self.scale * ctx.progress


@struct.dataclass
class Cosine:
    """Increasing cosine schedule (Wang et al. 2024): ``scale * (1 - cos(pi * p))``, mean ``scale``."""

    scale: Number

    def __call__(self, ctx: StepContext) -> jax.Array:
        return self.scale * (1.0 - jnp.cos(jnp.pi * ctx.progress))


@struct.dataclass
class ClampLinear:
    """Clamp-linear (Wang et al. 2024): the linear schedule, never below ``clamp``."""

    scale: Number
    clamp: Number = 1.0

    def __call__(self, ctx: StepContext) -> jax.Array:
        return jnp.maximum(self.clamp, 2.0 * self.scale * ctx.progress)


SCHEDULES = (PerStep, Linear, Cosine, ClampLinear)


def value_at(v: Any, ctx: StepContext) -> jax.Array:
    """A number, or a schedule's value at this step."""
    return v(ctx) if isinstance(v, SCHEDULES) else jnp.asarray(v, jnp.float32)


# --- the method protocol -------------------------------------------------------------------------------------


class Method:
    """Base of the guidance methods (each a ``flax.struct`` dataclass)."""

    renoises = False  # the sampler renoises with Guided.renoise (CFG++)
    shifts_mean = False  # Guided.mean_shift moves the ancestral mean (classifier guidance, algorithm 1)

    def passes(self) -> tuple[str, ...]:
        """Every pass this method may ask for (static)."""
        return (UNCOND, COND)

    def init_state(self, x: jax.Array) -> Any:
        return ()

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        raise NotImplementedError

    def evaluate(self, run: RunPasses, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        return self.combine(run(self.passes()), ctx, state)

    def check(self, sampler: Any) -> Method:
        """Validate against the sampler (a registry.Sampler) and resolve choices that depend on it."""
        return self

    def describe(self) -> str:
        """A short text for image metadata."""
        return type(self).__name__


def _cfg(uncond: jax.Array, cond: jax.Array, scale: jax.Array) -> jax.Array:
    return uncond + scale * (cond - uncond)


def rescale(guided: jax.Array, cond: jax.Array, amount: jax.Array | float) -> jax.Array:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4).

    Scales the guided prediction to the per-image standard deviation of the conditional one, then mixes by
    ``amount``. Standard deviations are unbiased, as diffusers' ``rescale_noise_cfg`` computes them.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return amount * rescaled + (1.0 - amount) * guided


def _rescaled(guided: jax.Array, cond: jax.Array, amount: Number, space: str, ctx: StepContext) -> jax.Array:
    amount = jnp.asarray(amount, jnp.float32)
    if space == "output":
        return jnp.where(amount > 0, rescale(guided, cond, amount), guided)
    g, c = ctx.to_space(guided, space), ctx.to_space(cond, space)
    return jnp.where(amount > 0, ctx.from_space(rescale(g, c, amount), space), guided)


@struct.dataclass
class Conditional(Method):
    """No guidance: the conditional prediction alone (one pass)."""

    def passes(self) -> tuple[str, ...]:
        return (COND,)

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        return Guided(preds[COND], cond=preds[COND]), state


@struct.dataclass
class CFG(Method):
    """Classifier-free guidance (Ho & Salimans 2022), diffusers' convention ``u + scale * (c - u)``.

    ``scale``: a number, a schedule (``PerStep``, ``Linear``, ``Cosine``, ``ClampLinear``) or a sweep.
    ``rescale``: guidance rescale amount (Lin et al. 2023) in ``rescale_space``: "output" (the model's raw
    output, as diffusers' ``guidance_rescale``), "eps", "x0" or "v" (ComfyUI's RescaleCFG works in v).
    """

    scale: Any = 7.5
    rescale: Number = 0.0
    rescale_space: str = struct.field(pytree_node=False, default="output")

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        u, c = preds[UNCOND], preds[COND]
        guided = _cfg(u, c, value_at(self.scale, ctx))
        guided = _rescaled(guided, c, self.rescale, check_space(self.rescale_space), ctx)
        return Guided(guided, cond=c, uncond=u), state

    def describe(self) -> str:
        return "CFG" if isinstance(self.scale, int | float) else f"CFG ({type(self.scale).__name__} scale)"


def _plain(method: Method, cond: jax.Array, ctx: StepContext) -> Guided:
    """The unguided result, shaped like ``method``'s (so both branches of a ``lax.cond`` agree)."""
    return Guided(cond, renoise=ctx.to_eps(cond) if method.renoises else None,
                  mean_shift=jnp.zeros_like(ctx.x) if method.shifts_mean else None, cond=cond,
                  uncond=cond if UNCOND in method.passes() else None)


@struct.dataclass
class Interval(Method):
    """Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality"): ``method`` where the evaluated sigma lies in
    (sigma_min, sigma_max], the conditional prediction elsewhere.

    Outside the interval only the conditional pass runs (``lax.cond`` executes one branch). Under a sweep of
    the bounds (vmap) both branches run and a select picks, so a sweep saves no UNet passes.
    """

    method: Method
    sigma_min: Number = 0.0
    sigma_max: Number = math.inf

    @property
    def renoises(self) -> bool:  # type: ignore[override]
        return self.method.renoises

    @property
    def shifts_mean(self) -> bool:  # type: ignore[override]
        return self.method.shifts_mean

    def passes(self) -> tuple[str, ...]:
        inner = self.method.passes()
        return inner if COND in inner else (*inner, COND)

    def init_state(self, x: jax.Array) -> Any:
        return self.method.init_state(x)

    def evaluate(self, run: RunPasses, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        inside = (ctx.sigma > self.sigma_min) & (ctx.sigma <= self.sigma_max)

        def guided() -> tuple[Guided, Any]:
            return self.method.evaluate(run, ctx, state)

        def unguided() -> tuple[Guided, Any]:
            return _plain(self.method, run((COND,))[COND], ctx), state

        return lax.cond(inside, guided, unguided)

    def check(self, sampler: Any) -> Method:
        return self.replace(method=self.method.check(sampler))

    def describe(self) -> str:
        return f"{self.method.describe()} in sigma interval"


def NegativeMinSigma(method: Method, sigma: Number) -> Interval:  # noqa: N802 (a constructor)
    """A1111's "Negative Guidance minimum sigma" (NGMS): below ``sigma`` the unconditional pass is skipped."""
    return Interval(method, sigma_min=sigma, sigma_max=math.inf)


@struct.dataclass
class CFGPlusPlus(Method):
    """CFG++ (Chung et al. 2025, ICLR): x0 from ``u + lam * (c - u)``, re-noised with the unconditional eps.

    ``lam`` in [0, 1] plays the role of the guidance scale (the paper's lambda). Samplers: ddim, euler,
    euler_a, dpmpp_2m (ComfyUI's *_cfg_pp forms).
    """

    lam: Number = 0.6
    renoises = True

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        u, c = preds[UNCOND], preds[COND]
        return Guided(_cfg(u, c, value_at(self.lam, ctx)), renoise=ctx.to_eps(u), cond=c, uncond=u), state

    def check(self, sampler: Any) -> Method:
        if not sampler.renoise:  # the registry's renoise=True samplers (not imported here: no import cycle)
            raise ValueError(f"CFG++ does not work with sampler {sampler.name!r}; samplers that have it: "
                             "ddim, euler, euler_a, dpmpp_2m")
        return self


@struct.dataclass
class APG(Method):
    """Adaptive projected guidance (Sadat et al. 2025, ICLR, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models").

    diffusers' ``normalized_guidance``: Δ = c - u; running average ``Δ + momentum * previous`` (carried in the
    loop); Δ scaled down to norm ``norm_threshold`` if larger (> 0 enables it); split into the parts parallel
    and orthogonal to c (norms per image over all non-batch axes); result ``u + scale * (Δ_orth + eta *
    Δ_par)``. The paper's final combination adds to c (ComfyUI does too); diffusers adds to u, as here.
    ``space``: "x0" (the paper's, default: predictions turned into x0 with the step's sigma) or "output"
    (diffusers' guider, on raw outputs).
    """

    scale: Any = 7.5
    eta: Number = 0.0
    momentum: Number = 0.0
    norm_threshold: Number = 0.0
    space: str = struct.field(pytree_node=False, default="x0")

    def init_state(self, x: jax.Array) -> Any:
        return jnp.zeros_like(x, jnp.float32)  # running average of Δ (diffusers' MomentumBuffer)

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        space = check_space(self.space)
        u, c = ctx.to_space(preds[UNCOND], space), ctx.to_space(preds[COND], space)
        pred, average = apg_combine(c, u, value_at(self.scale, ctx), state, eta=self.eta,
                                    momentum=self.momentum, norm_threshold=self.norm_threshold)
        return Guided(ctx.from_space(pred, space), cond=preds[COND], uncond=preds[UNCOND]), average


def apg_combine(cond: jax.Array, uncond: jax.Array, scale: Number, average: jax.Array, *, eta: Number,
                momentum: Number, norm_threshold: Number) -> tuple[jax.Array, jax.Array]:
    """diffusers' ``normalized_guidance`` with its MomentumBuffer as explicit state (momentum 0 = off)."""
    diff = cond - uncond
    average = diff + momentum * average
    diff = average
    norm = per_image_norm(diff)
    threshold = jnp.asarray(norm_threshold, jnp.float32)
    diff = jnp.where(threshold > 0, diff * jnp.minimum(1.0, threshold / norm), diff)
    unit = cond / jnp.maximum(per_image_norm(cond), 1e-12)  # torch.nn.functional.normalize's eps
    parallel = per_image_sum(diff * unit) * unit
    orthogonal = diff - parallel
    return uncond + scale * (orthogonal + eta * parallel), average


@struct.dataclass
class PerpNeg(Method):
    """Perp-Neg (Armandpour et al. 2023): a negative prompt whose component along the positive direction is
    removed, so it cannot cancel the prompt. Three passes: the prompt, the empty prompt and the negative
    prompt. ``empty + scale * (pos - neg_scale * perp(neg, pos))`` with pos, neg measured from the empty
    prediction and the projection per image (ComfyUI's PerpNeg projects over the whole batch).
    """

    scale: Any = 7.5
    neg_scale: Number = 1.0

    def passes(self) -> tuple[str, ...]:
        return (EMPTY, COND, UNCOND)

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        empty, c, neg = preds[EMPTY], preds[COND], preds[UNCOND]
        pos, negative = c - empty, neg - empty
        perp = negative - per_image_sum(negative * pos) / jnp.maximum(per_image_sum(pos * pos), 1e-12) * pos
        guided = empty + value_at(self.scale, ctx) * (pos - self.neg_scale * perp)
        return Guided(guided, cond=c, uncond=neg), state


@struct.dataclass
class CFGZeroStar(Method):
    """CFG-Zero* (Fan et al. 2025): the unconditional prediction scaled by the optimal
    ``alpha = <c, u> / |u|^2`` per image, and the first ``zero_init_steps`` + 1 steps output zero (diffusers'
    ``ClassifierFreeZeroStarGuidance``: ``u * alpha + scale * (c - u * alpha)``)."""

    scale: Any = 7.5
    zero_init_steps: Number = 1
    use_zero_init: bool = struct.field(pytree_node=False, default=True)

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        u, c = preds[UNCOND], preds[COND]
        alpha = per_image_sum(c * u) / (per_image_sum(u * u) + 1e-8)
        u_star = u * alpha
        guided = u_star + value_at(self.scale, ctx) * (c - u_star)
        if self.use_zero_init:
            guided = jnp.where(ctx.step < self.zero_init_steps, jnp.zeros_like(guided), guided)
        return Guided(guided, cond=c, uncond=u), state


@struct.dataclass
class TCFG(Method):
    """Tangential CFG (Kwon et al. 2025): the unconditional prediction projected onto the first right
    singular vector of the stacked [cond, uncond] matrix per image (diffusers'
    ``TangentialClassifierFreeGuidance``), then ``u' + scale * (c - u')``."""

    scale: Any = 7.5

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        u, c = preds[UNCOND], preds[COND]
        b = u.shape[0]
        stacked = jnp.stack([c.reshape(b, -1), u.reshape(b, -1)], axis=1)  # (B, 2, N)
        _, _, vh = jnp.linalg.svd(stacked, full_matrices=False)  # (B, 2, N)
        top = vh[:, :1]  # keep the principal direction only
        u_flat = u.reshape(b, 1, -1)
        projected = (u_flat @ jnp.swapaxes(top, 1, 2)) @ top
        u_t = projected.reshape(u.shape)
        return Guided(u_t + value_at(self.scale, ctx) * (c - u_t), cond=c, uncond=u), state



# mcmonkey's sd-dynamic-thresholding: scale schedules (``DynThresh.Modes``) over frac = step / (steps - 1).
DYNTHRESH_MODES = ("Constant", "Linear Down", "Cosine Down", "Half Cosine Down", "Linear Up", "Cosine Up",
                   "Half Cosine Up", "Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")
DYNTHRESH_STARTPOINTS = ("MEAN", "ZERO")
DYNTHRESH_VARIABILITIES = ("AD", "STD")


def dynthresh_schedule(scale: jax.Array, mode: str, minimum: Number, value: Number, frac: jax.Array) -> jax.Array:
    """The extension's ``interpret_scale``: ``min + (scale - min) * f(frac)`` (its constants kept as written)."""
    frac = jnp.asarray(frac)
    factors = {
        "Constant": lambda: jnp.ones_like(frac),
        "Linear Down": lambda: 1.0 - frac,
        "Half Cosine Down": lambda: jnp.cos(frac),
        "Cosine Down": lambda: jnp.cos(frac * 1.5707),
        "Linear Up": lambda: frac,
        "Half Cosine Up": lambda: 1.0 - jnp.cos(frac),
        "Cosine Up": lambda: 1.0 - jnp.cos(frac * 1.5707),
        "Power Up": lambda: frac ** value,
        "Power Down": lambda: 1.0 - frac ** value,
        "Linear Repeating": lambda: jnp.abs(jnp.mod(frac * value, 1.0) - 0.5) * 2.0,
        "Cosine Repeating": lambda: jnp.cos(frac * 6.28318 * value) * 0.5 + 0.5,
        "Sawtooth": lambda: jnp.mod(frac * value, 1.0),
    }
    return minimum + (scale - minimum) * factors[mode]()


def dynthresh_combine(cond: jax.Array, uncond: jax.Array, scale: Number, mimic_scale: Number, *,
                      threshold_percentile: Number = 1.0, interpolate_phi: Number = 1.0,
                      separate_feature_channels: bool = True, scaling_startpoint: str = "MEAN",
                      variability_measure: str = "AD") -> jax.Array:
    """The extension's ``dynthresh`` on x0 predictions (B, ..., C), channels last, per image.

    The CFG result at ``scale`` is centred on its per-channel means and its spread (max abs deviation, its
    ``threshold_percentile`` quantile for the CFG side, or the std) brought to that of the result at
    ``mimic_scale``. With ``separate_feature_channels=False`` the spread is per image over all channels; the
    extension measures it over the whole batch, which would make an image depend on its batch-mates.
    """
    b = cond.shape[0]
    channels = cond.shape[-1] if cond.ndim > 2 else 1
    diff = cond - uncond
    mim_target = uncond + mimic_scale * diff
    cfg_target = uncond + scale * diff
    mim = mim_target.reshape(b, -1, channels)  # (B, N, C): the extension's flatten(2), channels last
    cfg = cfg_target.reshape(b, -1, channels)
    cfg_means = jnp.mean(cfg, axis=1, keepdims=True)
    mim_centered = mim - jnp.mean(mim, axis=1, keepdims=True)
    cfg_centered = cfg - cfg_means
    axes = (1,) if separate_feature_channels else (1, 2)
    if variability_measure == "STD":
        mim_ref = jnp.std(mim_centered, axis=axes, keepdims=True, ddof=1)  # torch.std is unbiased
        cfg_ref = jnp.std(cfg_centered, axis=axes, keepdims=True, ddof=1)
    else:
        mim_ref = jnp.max(jnp.abs(mim_centered), axis=axes, keepdims=True)
        deviations = jnp.abs(cfg_centered) if separate_feature_channels else jnp.abs(cfg_centered).reshape(b, -1, 1)
        cfg_ref = jnp.quantile(deviations, jnp.asarray(threshold_percentile, deviations.dtype), axis=1, keepdims=True)
    if scaling_startpoint == "ZERO":
        result = cfg * (mim_ref / cfg_ref)
    elif variability_measure == "STD":
        result = cfg_centered / cfg_ref * mim_ref + cfg_means
    else:
        max_ref = jnp.maximum(mim_ref, cfg_ref)
        result = jnp.clip(cfg_centered, -max_ref, max_ref) / max_ref * mim_ref + cfg_means
    result = result.reshape(cond.shape)
    return result * interpolate_phi + cfg_target * (1.0 - interpolate_phi)


@struct.dataclass
class DynamicThresholding(Method):
    """Dynamic thresholding, "CFG scale fix" (mcmonkey's sd-dynamic-thresholding for A1111 / ComfyUI): CFG at
    ``scale``, its x0 prediction re-spread per channel to look like CFG at the lower ``mimic_scale``, so high
    scales keep their prompt adherence without burning (the latent "mimic scale" variant of Imagen's
    dynamic thresholding).

    In x0 space (the denoised predictions, as the extension works in both UIs). Fields and defaults as the
    extension's: ``threshold_percentile`` a fraction (A1111's UI slider is a percentage: 100 = 1.0),
    ``mimic_mode`` / ``cfg_mode`` one of ``DYNTHRESH_MODES`` with ``*_scale_min`` and ``sched_val`` (A1111's
    default 4; ComfyUI's 1), over frac = step / (steps - 1) as in A1111; ``separate_feature_channels``,
    ``scaling_startpoint`` ("MEAN", "ZERO"), ``variability_measure`` ("AD", "STD"), ``interpolate_phi`` (1:
    all dynamic thresholding, 0: plain CFG). Modes and switches are static; the numbers traced. ComfyUI's node
    returns plain CFG when the two scales are equal; this, as the A1111 extension, always thresholds.
    """

    scale: Any = 7.5
    mimic_scale: Number = 7.0
    threshold_percentile: Number = 1.0
    mimic_scale_min: Number = 0.0
    cfg_scale_min: Number = 0.0
    sched_val: Number = 4.0
    interpolate_phi: Number = 1.0
    mimic_mode: str = struct.field(pytree_node=False, default="Constant")
    cfg_mode: str = struct.field(pytree_node=False, default="Constant")
    separate_feature_channels: bool = struct.field(pytree_node=False, default=True)
    scaling_startpoint: str = struct.field(pytree_node=False, default="MEAN")
    variability_measure: str = struct.field(pytree_node=False, default="AD")

    def check(self, sampler: Any) -> Method:
        for name, value, valid in (("mimic_mode", self.mimic_mode, DYNTHRESH_MODES),
                                   ("cfg_mode", self.cfg_mode, DYNTHRESH_MODES),
                                   ("scaling_startpoint", self.scaling_startpoint, DYNTHRESH_STARTPOINTS),
                                   ("variability_measure", self.variability_measure, DYNTHRESH_VARIABILITIES)):
            if value not in valid:
                raise ValueError(f"DynamicThresholding {name}={value!r}: choose one of {', '.join(valid)}")
        return self

    def combine(self, preds: Predictions, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        u, c = preds[UNCOND], preds[COND]
        frac = jnp.asarray(ctx.step, jnp.float32) / max(ctx.num_steps - 1, 1)
        mimic = dynthresh_schedule(jnp.asarray(self.mimic_scale, jnp.float32), self.mimic_mode,
                                   self.mimic_scale_min, self.sched_val, frac)
        scale = dynthresh_schedule(value_at(self.scale, ctx), self.cfg_mode, self.cfg_scale_min, self.sched_val, frac)
        x0 = dynthresh_combine(ctx.to_x0(c), ctx.to_x0(u), scale, mimic,
                               threshold_percentile=self.threshold_percentile, interpolate_phi=self.interpolate_phi,
                               separate_feature_channels=self.separate_feature_channels,
                               scaling_startpoint=self.scaling_startpoint,
                               variability_measure=self.variability_measure)
        return Guided(ctx.from_x0(x0), cond=c, uncond=u), state

    def describe(self) -> str:
        return "dynamic thresholding (mimic scale)"


@struct.dataclass
class ClassifierGuidance(Method):
    """Classifier guidance (Dhariwal & Nichol 2021) through ``jax.grad``, on top of ``inner``.

    ``log_prob(x, t) -> (B,)``: any differentiable function of what the UNet sees (its NHWC latent input)
    and the timestep. ``on="x_t"`` (the paper's noise-aware classifier):
      - algorithm 1 (``ddpm``): the ancestral mean moves by ``scale * Σ * ∇ log p(y | x_t)``;
      - algorithm 2 (any sampler): ``eps - sqrt(1 - ᾱ) * scale * ∇ log p(y | x_t)`` (x0 form: D + σ² s ∇);
      - ``"auto"``: 1 for ``ddpm``, 2 otherwise.
    ``on="x0"`` (universal guidance, Bansal et al. 2023): the gradient of ``log_prob`` at the model's x0
    estimate, taken through the model; with ``decode=True`` ``log_prob`` receives VAE-decoded pixels in
    [0, 1] instead (a classifier of clean images). Applied as algorithm 2.
    """

    log_prob: Callable[[jax.Array, jax.Array], jax.Array] = struct.field(pytree_node=False, default=None)
    scale: Any = 1.0
    inner: Method = struct.field(default_factory=Conditional)
    algorithm: Any = struct.field(pytree_node=False, default="auto")
    on: str = struct.field(pytree_node=False, default="x_t")
    decode: bool = struct.field(pytree_node=False, default=False)

    @property
    def renoises(self) -> bool:  # type: ignore[override]
        return self.inner.renoises

    @property
    def shifts_mean(self) -> bool:  # type: ignore[override]
        return self.algorithm == 1

    def passes(self) -> tuple[str, ...]:
        return self.inner.passes()

    def init_state(self, x: jax.Array) -> Any:
        return self.inner.init_state(x)

    def check(self, sampler: Any) -> Method:
        if self.log_prob is None:
            raise ValueError("ClassifierGuidance needs log_prob, a function (x_t, t) -> log p(y | x_t) of shape (B,)")
        if self.on not in ("x_t", "x0"):
            raise ValueError(f"ClassifierGuidance on={self.on!r}: choose 'x_t' or 'x0'")
        if self.decode and self.on != "x0":
            raise ValueError("ClassifierGuidance decode=True needs on='x0' (pixels come from the x0 estimate)")
        algorithm = self.algorithm
        if algorithm == "auto":
            algorithm = 1 if sampler.mean_shift and self.on == "x_t" else 2
        if algorithm not in (1, 2):
            raise ValueError(f"ClassifierGuidance algorithm={self.algorithm!r}: choose 1, 2 or 'auto'")
        if algorithm == 1 and not sampler.mean_shift:
            raise ValueError(f"classifier guidance algorithm 1 shifts an ancestral mean; sampler {sampler.name!r} "
                             "has none (use 'ddpm', or algorithm 2)")
        if algorithm == 1 and self.on != "x_t":
            raise ValueError("classifier guidance algorithm 1 needs on='x_t'")
        return self.replace(algorithm=algorithm, inner=self.inner.check(sampler))

    def _log_prob(self, x: jax.Array, ctx: StepContext) -> jax.Array:
        return jnp.sum(self.log_prob(x, ctx.t))

    def evaluate(self, run: RunPasses, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        scale = value_at(self.scale, ctx)
        if self.on == "x_t":
            guided, state = self.inner.evaluate(run, ctx, state)
            grad = jax.grad(lambda x: self._log_prob(x, ctx))(ctx.x)
        else:
            def through_model(x: jax.Array) -> tuple[jax.Array, tuple[Guided, Any]]:
                step = ctx.replace(x=x)
                result = self.inner.evaluate(lambda passes, at=None: run(passes, x if at is None else at), step,
                                             state)
                x0 = step.to_x0(result[0].out)
                if self.decode:
                    if ctx.decode is None:
                        raise ValueError("ClassifierGuidance decode=True: this loop has no VAE decoder")
                    x0 = ctx.decode(x0)
                return self._log_prob(x0, step), result

            grad, (guided, state) = jax.grad(through_model, has_aux=True)(ctx.x)
            grad = jax.lax.stop_gradient(grad)
        if self.algorithm == 1:
            shift = scale * grad
            if guided.mean_shift is not None:
                shift = shift + guided.mean_shift
            return guided._replace(mean_shift=shift), state
        eps = ctx.to_eps(guided.out) - ctx.sigma_t * scale * grad
        return guided._replace(out=ctx.from_eps(eps)), state

    def describe(self) -> str:
        return f"classifier guidance (algorithm {self.algorithm}, on {self.on}) + {self.inner.describe()}"


def composable_passes(inner: tuple[str, ...], parts: int) -> tuple[str, ...]:
    """The passes of :class:`Composable` around a method with passes ``inner``: the prompt's pass replaced by
    its ``parts`` AND parts, and the unconditional pass (their common baseline) added if missing."""
    out = [p for p in inner if p != COND]
    if UNCOND not in out:
        out.insert(0, UNCOND)
    return (*out, *cond_parts(parts))


@struct.dataclass
class Composable(Method):
    """Composable diffusion (Liu et al. 2022) as AUTOMATIC1111 combines ``a AND b:0.7`` prompts, around any
    method: wherever ``method`` asks for the conditional pass it gets ``u + sum_k w_k (c_k - u)`` from the
    parts' passes c_k (``"cond"``, ``"cond_1"``, ...) and the unconditional pass u. Under CFG that is A1111's
    ``combine_denoised``: ``u + scale * sum_k w_k (c_k - u)`` (the combination is linear and holds x fixed, so
    raw outputs give what A1111 computes on denoised x0). ``weights``: (B, K) per image, 0 for the parts a
    prompt does not have. The unconditional pass always runs (also when ``method`` alone would not)."""

    method: Method
    weights: Any  # (B, K)

    @property
    def renoises(self) -> bool:  # type: ignore[override]
        return self.method.renoises

    @property
    def shifts_mean(self) -> bool:  # type: ignore[override]
        return self.method.shifts_mean

    @property
    def parts(self) -> int:
        return int(jnp.shape(self.weights)[-1])

    def passes(self) -> tuple[str, ...]:
        return composable_passes(self.method.passes(), self.parts)

    def init_state(self, x: jax.Array) -> Any:
        return self.method.init_state(x)

    def combined(self, preds: Predictions) -> jax.Array:
        """``u + sum_k w_k (c_k - u)``, adding the parts in order as A1111 does."""
        u = preds[UNCOND]
        w = jnp.asarray(self.weights, jnp.float32)
        total = jnp.zeros_like(u)
        for k, name in enumerate(cond_parts(self.parts)):
            total = total + w[:, k].reshape((-1,) + (1,) * (u.ndim - 1)) * (preds[name] - u)
        return u + total

    def evaluate(self, run: RunPasses, ctx: StepContext, state: Any) -> tuple[Guided, Any]:
        parts = cond_parts(self.parts)

        def expanded(passes: tuple[str, ...], x: jax.Array | None = None) -> Predictions:
            passes = tuple(passes)
            if COND not in passes:
                return run(passes, x)
            others = tuple(p for p in passes if p not in (COND, UNCOND))
            preds = run((UNCOND, *others, *parts), x)
            out = {p: preds[p] for p in passes if p != COND}
            out[COND] = self.combined(preds)
            return out

        return self.method.evaluate(expanded, ctx, state)

    def check(self, sampler: Any) -> Method:
        return self.replace(method=self.method.check(sampler))

    def describe(self) -> str:
        return f"{self.method.describe()} with AND prompts"


# --- sweeps ---------------------------------------------------------------------------------------------------


def _leaf_ndims(tree: Any) -> Any:
    """Base rank of each numeric leaf: 0, or 1 for the fields a class lists in ``vector_fields``."""
    def visit(node: Any, base: int) -> Any:
        if isinstance(node, Method | PerStep | Linear | Cosine | ClampLinear):
            vector = getattr(type(node), "vector_fields", ())
            children = {}
            for name in node.__dataclass_fields__:
                field = node.__dataclass_fields__[name]
                if not field.metadata.get("pytree_node", True):
                    continue
                children[name] = visit(getattr(node, name), 1 if name in vector else 0)
            return node.replace(**children)
        return jax.tree.map(lambda _: base, node)

    return visit(tree, 0)


def sweep_size(method: Method) -> int | None:
    """K if some numeric field holds K values beyond its base rank (all such fields must agree), else None."""
    sizes = set()
    for leaf, base in zip(jax.tree.leaves(method), jax.tree.leaves(_leaf_ndims(method)), strict=True):
        shape = jnp.shape(leaf)
        if len(shape) > base + 1:
            raise ValueError(f"a guidance value has shape {shape}: give a number or a 1-D array of values")
        if len(shape) == base + 1:
            sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(f"swept guidance values have different lengths {sorted(sizes)}; give equal lengths")
    return sizes.pop() if sizes else None


def sweep_axes(method: Method) -> Any:
    """vmap ``in_axes`` for a swept method: 0 on the swept leaves, None elsewhere."""
    return jax.tree.map(lambda leaf, base: 0 if jnp.ndim(leaf) > base else None, method, _leaf_ndims(method))


def as_arrays(method: Method) -> Method:
    """Every numeric leaf as float32 numpy (so a Python 7.5 and np.float32(7.5) share one compile)."""
    import numpy as np

    return jax.tree.map(lambda v: np.asarray(v, np.float32), method)
