"""Noise schedules, read from diffusers' ``scheduler/scheduler_config.json``.

Everything here runs once per (config, sampler, step count) on the host with numpy; the result is a
:class:`Schedule` of small float32 arrays that the sampling loop indexes with a traced step number. The
arithmetic follows diffusers' schedulers line for line (including their rounding of timesteps and their
float32 casts), because the UNet must see exactly the timesteps diffusers gives it.

Vocabulary: ``alphas_cumprod`` (``a``) is the training schedule's alpha-bar; ``sigma = sqrt((1 - a) / a)``
is the k-diffusion noise level, where a latent is ``x0 + sigma * noise`` ("sigma space", as diffusers'
Euler-family schedulers); ``sqrt(a) * x0 + sqrt(1 - a) * noise`` is the variance-preserving form that
diffusers' DDIM, PNDM, DPM-Solver, UniPC and LCM schedulers carry ("timestep space").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sdjax.models.config import ConfigError, parse_config, read_json

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SIGMA_SCHEDULES = ("default", "karras", "exponential")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# diffusers sets the last alpha-bar of a zero-terminal-SNR schedule to this (instead of 0) in its
# sigma-space schedulers, so that sigma stays finite.
ZERO_SNR_ALPHA = 2.0**-24

# Keys of diffusers scheduler configs that must hold these values: anything else changes the math in a
# way sdjax does not implement (dynamic thresholding, flow matching, learned variance, ...).
_REQUIRED = {
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "variance_type": (None, "fixed_small"),
    "lower_order_final": (True,),
    "euler_at_final": (False,),
    "predict_x0": (True,),
    "disable_corrector": ((),),
    "solver_p": (None,),
    "shift_terminal": (None,),
}

# Keys with no effect here: the sampler name fixes the algorithm (solver order and type, PRK warm-up),
# and the others only matter together with a value that _REQUIRED or clip_sample=False rules out.
_IGNORED = frozenset({
    "solver_order", "algorithm_type", "solver_type", "skip_prk_steps", "noise_sampler_seed", "flow_shift",
    "time_shift_type",
})

# Values for keys a config file leaves out. diffusers fills those with the defaults of the scheduler class
# that reads the file (``from_config`` drops values the writer only defaulted: ``_use_default_values``), so
# the same file gives "leading" spacing to DDIM and "linspace" to Euler. Per-sampler overrides live in
# registry.Sampler.config_defaults.
BASE_DEFAULTS: dict[str, Any] = {
    "timestep_spacing": "linspace", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "set_alpha_to_one": True, "clip_sample": False,
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise-schedule part of a diffusers scheduler config (hashable: a static argument under jit).

    None marks a key the file left out; :meth:`with_defaults` fills it for a given sampler.
    """

    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool | None = None
    # x0 clipping / Imagen's dynamic thresholding: DDIM and DDPM apply them (as diffusers' DDIM/DDPM do)
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    original_inference_steps: int = 50  # LCM
    timestep_scaling: float = 10.0  # LCM

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ConfigError(f"dynamic_thresholding_ratio={self.dynamic_thresholding_ratio} must be in (0, 1]")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ConfigError("scheduler config sets both use_karras_sigmas and use_exponential_sigmas")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(
                f"trained_betas has {len(self.trained_betas)} values, num_train_timesteps is "
                f"{self.num_train_timesteps}"
            )
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps={self.num_train_timesteps} must be at least 2")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SchedulerConfig:
        defaulted = set(raw.get("_use_default_values") or ())  # values the writer never chose
        raw = {k: v for k, v in raw.items() if k not in defaulted}
        return parse_config(cls, raw, required_values=_REQUIRED, ignored=_IGNORED, what="scheduler")

    @classmethod
    def from_json(cls, path: str | Path) -> SchedulerConfig:
        return cls.from_dict(read_json(path))

    def with_defaults(self, defaults: Mapping[str, Any]) -> SchedulerConfig:
        """Fill the keys the file left out: ``defaults`` (a sampler's diffusers class), then BASE_DEFAULTS."""
        fill = {k: defaults.get(k, v) for k, v in BASE_DEFAULTS.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    @property
    def sigma_schedule(self) -> str:
        """The sigma schedule the config asks for (diffusers' use_karras_sigmas / use_exponential_sigmas)."""
        if self.use_karras_sigmas:
            return "karras"
        if self.use_exponential_sigmas:
            return "exponential"
        return "default"


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"unsupported scheduler config: {key}={value!r} (sdjax supports {', '.join(choices)})")


def check_sigma_schedule(name: str) -> str:
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; valid: {', '.join(SIGMA_SCHEDULES)}")
    return name


# --- training schedule ------------------------------------------------------------------------------------


def betas(config: SchedulerConfig) -> np.ndarray:
    """Training betas, float32, as diffusers builds them (before any zero-SNR rescaling)."""
    config = config.with_defaults({})  # keys the file left out: diffusers' usual defaults
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, np.float32)
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    return _cosine_betas(n)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (arXiv 2305.08891, Algorithm 1), in float32."""
    sqrt_ab = np.sqrt(_cumprod(1.0 - b))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _cumprod(a: np.ndarray) -> np.ndarray:
    # PyTorch accumulates float32 cumprods in float64 on CPU; doing the same reproduces its values exactly.
    return np.cumprod(a.astype(np.float64)).astype(np.float32)


def alphas_cumprod(config: SchedulerConfig, *, clamp_zero_snr: bool = False) -> np.ndarray:
    """Training alpha-bar per timestep (float32).

    ``clamp_zero_snr``: replace a terminal 0 by 2**-24, as diffusers' sigma-space schedulers and DPM-Solver /
    UniPC do (DDIM, DDPM and LCM keep the exact 0).
    """
    b = betas(config)
    if config.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    ac = _cumprod(1.0 - b)
    if config.rescale_betas_zero_snr and clamp_zero_snr:
        ac[-1] = ZERO_SNR_ALPHA
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas of the training timesteps, float32 like diffusers."""
    return (((1 - ac) / ac) ** 0.5).astype(np.float32)


def sigma_to_alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sigma-space noise level -> variance-preserving (alpha_t, sigma_t), in float32 like diffusers."""
    sigma = np.asarray(sigma, np.float32)
    alpha_t = (np.float32(1) / (sigma**2 + np.float32(1)) ** np.float32(0.5)).astype(np.float32)
    return alpha_t, (sigma * alpha_t).astype(np.float32)


# --- inference timesteps and sigmas -------------------------------------------------------------------------


def check_num_steps(config: SchedulerConfig, num_steps: int) -> None:
    if not isinstance(num_steps, int | np.integer) or isinstance(num_steps, bool):
        raise TypeError(f"num_steps must be an int, got {num_steps!r}")
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps="
                         f"{config.num_train_timesteps}")


def spaced_timesteps(config: SchedulerConfig, num_steps: int, *, integer: bool) -> np.ndarray:
    """Descending inference timesteps for diffusers' ``timestep_spacing``.

    ``integer``: the DDIM/DDPM/PNDM/LCM form (int64, linspace rounded); otherwise the float32 form of the
    Euler-family schedulers (linspace not rounded).
    """
    t_train, n = config.num_train_timesteps, num_steps
    spacing = config.timestep_spacing
    if spacing == "linspace":
        if integer:
            return np.linspace(0, t_train - 1, n).round()[::-1].astype(np.int64)
        return np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, n) * (t_train // n)).round()[::-1].astype(np.int64 if integer else np.float32)
        return ts + config.steps_offset
    ts = np.round(np.arange(t_train, 0, -t_train / n)).astype(np.int64 if integer else np.float32)
    return ts - 1


def multistep_timesteps(config: SchedulerConfig, num_steps: int, *, last_timestep: int) -> np.ndarray:
    """DPM-Solver / UniPC timesteps: spacing over num_steps + 1 points with the last dropped (int64)."""
    n, spacing = num_steps, config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    ratio = config.num_train_timesteps / n
    return np.arange(last_timestep, 0, -ratio).round().astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule: uniform in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Uniform in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def convert_sigmas(kind: str, sigmas: np.ndarray, n: int) -> np.ndarray:
    """Replace a descending sigma sequence by the ``kind`` schedule between its ends."""
    lo, hi = float(sigmas[-1]), float(sigmas[0])
    return karras_sigmas(lo, hi, n) if kind == "karras" else exponential_sigmas(lo, hi, n)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma (as diffusers; the
    arithmetic runs in the inputs' precision, as there)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[None] - log_sigmas.reshape(-1, *([1] * sigma.ndim))
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


# --- the schedule the loop consumes -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-step arrays for one sampler, config and step count (a pytree: arrays are leaves, the rest static).

    N = number of steps. ``timesteps[i]`` is what the model receives at step i (first evaluation);
    ``sigmas[i]`` is the sigma-space noise level at the start of step i and ``sigmas[N]`` the final one.
    ``add_noise`` at step i is ``signal_scale[i] * x0 + noise_scale[i] * noise``; pure noise starts as
    ``noise * init_noise_sigma``. ``loop_timesteps`` is diffusers' ``scheduler.timesteps`` (one entry per
    model evaluation: second-order schedulers interleave), used to place SDXL's denoising_start/end.
    ``extra`` holds what a sampler needs beyond that. ``order`` is diffusers' ``scheduler.order``.

    Only what changes the traced computation is static (sampler, prediction type, ...): schedules that differ
    in spacing, betas or sigma schedule but not in step count share one compiled loop.
    """

    timesteps: jax.Array | np.ndarray
    sigmas: jax.Array | np.ndarray
    signal_scale: jax.Array | np.ndarray
    noise_scale: jax.Array | np.ndarray
    init_noise_sigma: jax.Array | np.ndarray
    loop_timesteps: jax.Array | np.ndarray
    extra: dict[str, jax.Array | np.ndarray]
    sampler: str
    prediction_type: str
    num_train_timesteps: int
    order: int
    final_first_order: bool  # DPM-Solver's lower_order_final: the last step is first order
    # DDIM / DDPM's processing of the x0 estimate: None, ("clip", range) or ("threshold", ratio, max value)
    x0_processing: tuple | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


jax.tree_util.register_dataclass(
    Schedule,
    data_fields=["timesteps", "sigmas", "signal_scale", "noise_scale", "init_noise_sigma", "loop_timesteps",
                 "extra"],
    meta_fields=["sampler", "prediction_type", "num_train_timesteps", "order", "final_first_order",
                 "x0_processing"],
)


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, np.float32)


def _schedule(sampler: str, config: SchedulerConfig, *, timesteps: Any, sigmas: Any, signal_scale: Any,
              noise_scale: Any, init_noise_sigma: float, loop_timesteps: Any = None, order: int = 1,
              **extra: Any) -> Schedule:
    num_steps = len(timesteps)
    return Schedule(
        timesteps=_f32(timesteps), sigmas=_f32(sigmas), signal_scale=_f32(signal_scale),
        noise_scale=_f32(noise_scale), init_noise_sigma=_f32(init_noise_sigma),
        loop_timesteps=_f32(timesteps if loop_timesteps is None else loop_timesteps),
        extra={k: _f32(v) for k, v in extra.items()}, sampler=sampler, prediction_type=config.prediction_type,
        num_train_timesteps=config.num_train_timesteps, order=order,
        # with lower_order_final=True and euler_at_final=False, which the config enforces
        final_first_order=config.final_sigmas_type == "zero" or num_steps < 15,
        x0_processing=_x0_processing(config) if sampler in ("ddim", "ddpm") else None,
    )


def _x0_processing(config: SchedulerConfig) -> tuple | None:
    # diffusers: thresholding wins over clip_sample
    if config.thresholding:
        return ("threshold", float(config.dynamic_thresholding_ratio), float(config.sample_max_value))
    if config.clip_sample:
        return ("clip", float(config.clip_sample_range))
    return None


# Sigma-space schedules (Euler, Euler a, Heun, DPM2, LMS, DPM++ SDE): the latent is x0 + sigma * noise.


def _sigma_space(config: SchedulerConfig, n: int, kind: str, *, round_karras: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, sigmas without the final one, log training sigmas) as diffusers' Euler-family set_timesteps."""
    ac = alphas_cumprod(config, clamp_zero_snr=True)
    train = train_sigmas(ac)
    log_train = np.log(train)
    ts = spaced_timesteps(config, n, integer=False)
    sig = np.interp(ts, np.arange(len(train)), train)
    if kind != "default":
        sig = convert_sigmas(kind, sig, n)
        ts = sigma_to_t(sig, log_train)
        if round_karras and kind == "karras":
            ts = ts.round()
    return ts, sig, log_train


def _sigma_space_schedule(sampler: str, config: SchedulerConfig, ts: np.ndarray, sigmas: np.ndarray,
                          **kwargs: Any) -> Schedule:
    sigmas = _f32(sigmas)
    sigma_max = float(sigmas.max())
    # diffusers' quirk: "leading" spacing starts pure noise at sqrt(sigma_max**2 + 1), the others at sigma_max.
    init = sigma_max if config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return _schedule(sampler, config, timesteps=ts, sigmas=sigmas, signal_scale=np.ones_like(sigmas),
                     noise_scale=sigmas, init_noise_sigma=init, **kwargs)


def euler_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """EulerDiscreteScheduler (also used for Euler a, which diffusers only offers with default sigmas)."""
    ts, sig, _ = _sigma_space(config, n, kind)
    last = 0.0
    if sampler == "euler" and config.final_sigmas_type == "sigma_min":
        last = float(train_sigmas(alphas_cumprod(config, clamp_zero_snr=True))[0])
    return _sigma_space_schedule(sampler, config, ts, np.append(sig, last))


def heun_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """HeunDiscreteScheduler: the second evaluation of step i is at sigma[i + 1] with timestep[i + 1]."""
    ts, sig, _ = _sigma_space(config, n, kind)
    t_next = np.append(ts[1:], 0.0)
    loop = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    return _sigma_space_schedule(sampler, config, ts, np.append(sig, 0.0), loop_timesteps=loop, order=2,
                                 t_next=t_next)


def dpm2_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """KDPM2DiscreteScheduler: the second evaluation is at the log-midpoint sigma (its timestep unrounded)."""
    ts, sig, log_train = _sigma_space(config, n, kind, round_karras=True)
    sigmas = _f32(np.append(sig, 0.0))
    # torch.lerp(log s[k+1], log s[k], 0.5) in float32, as diffusers
    log_hi, log_lo = np.log(sigmas[:-2]), np.log(sigmas[1:-1])
    mid = np.exp(log_hi - (log_hi - log_lo) * np.float32(0.5))
    t_mid = sigma_to_t(mid, log_train)
    loop = np.concatenate([ts[:1], np.stack([t_mid, ts[1:]], axis=-1).reshape(-1)])
    return _sigma_space_schedule(sampler, config, ts, sigmas, loop_timesteps=loop, order=2,
                                 sigma_mid=np.append(mid, 0.0), t_mid=np.append(t_mid, 0.0))


def lms_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """LMSDiscreteScheduler, with its linear-multistep coefficients precomputed (order up to 4)."""
    ts, sig, _ = _sigma_space(config, n, kind)
    sigmas = _f32(np.append(sig, 0.0))
    return _sigma_space_schedule(sampler, config, ts, sigmas, lms_coeffs=_lms_coefficients(sigmas))


def _lms_coefficients(sigmas: np.ndarray, max_order: int = 4) -> np.ndarray:
    """coeffs[i, k] multiplies the derivative from k steps back at step i (diffusers' get_lms_coefficient:
    the integral from sigma[i] to sigma[i+1] of the Lagrange basis polynomial over the last ``order`` sigmas)."""
    s = sigmas.astype(np.float64)
    n = len(s) - 1
    coeffs = np.zeros((n, max_order))
    for i in range(n):
        order = min(i + 1, max_order)
        for k in range(order):
            poly = np.polynomial.Polynomial([1.0])
            for j in range(order):
                if j != k:
                    poly *= np.polynomial.Polynomial([-s[i - j], 1.0]) / (s[i - k] - s[i - j])
            antiderivative = poly.integ()
            coeffs[i, k] = antiderivative(s[i + 1]) - antiderivative(s[i])
    return coeffs


def dpmpp_sde_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """DPMSolverSDEScheduler: the second evaluation is at sqrt(sigma[i] * sigma[i+1])."""
    ts, sig, log_train = _sigma_space(config, n, kind)
    t = -np.log(sig)
    mid = np.exp(-(t[:-1] + 0.5 * np.diff(t)))
    t_mid = sigma_to_t(mid, log_train)
    loop = np.concatenate([ts[:1], np.stack([t_mid, ts[1:]], axis=-1).reshape(-1)])
    return _sigma_space_schedule(sampler, config, ts, np.append(sig, 0.0), loop_timesteps=loop, order=2,
                                 t_mid=np.append(t_mid, 0.0))


# Timestep-space schedules (DDIM, DDPM, PNDM, LCM): integer timesteps, alpha-bar from the training table.


def _vp_scales(a: np.ndarray) -> dict[str, np.ndarray]:
    a = a.astype(np.float32)
    with np.errstate(divide="ignore"):
        sigmas = ((1 - a) / a) ** 0.5
    return {"sigmas": sigmas, "signal_scale": a**0.5, "noise_scale": (1 - a) ** 0.5}


def _final_alpha(config: SchedulerConfig, ac: np.ndarray) -> np.float32:
    return np.float32(1.0) if config.set_alpha_to_one else ac[0]


def ddim_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """DDIMScheduler: step i goes from alpha-bar[t_i] to alpha-bar[t_i - T // N] (not to t_{i+1}: the two
    differ for "trailing"/"linspace" spacing, and diffusers uses the former)."""
    ac = alphas_cumprod(config)
    ts = spaced_timesteps(config, n, integer=True)
    prev = ts - config.num_train_timesteps // n
    final = _final_alpha(config, ac)
    a = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    return _schedule(sampler, config, timesteps=ts, init_noise_sigma=1.0, alphas=a, alphas_prev=a_prev,
                     **_vp_scales(np.append(a, final)))


def ddpm_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """DDPMScheduler ("fixed_small" variance): step i goes to the next listed timestep, the last to alpha-bar 1."""
    ac = alphas_cumprod(config)
    ts = spaced_timesteps(config, n, integer=True)
    a = ac[ts]
    a_prev = np.append(a[1:], np.float32(1.0))
    return _schedule(sampler, config, timesteps=ts, init_noise_sigma=1.0, alphas=a, alphas_prev=a_prev,
                     **_vp_scales(np.append(a, np.float32(1.0))))


def pndm_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """PNDMScheduler(skip_prk_steps=True), i.e. PLMS.

    diffusers evaluates the model N + 1 times, on [t0, t1, t1, t2, ..., t_{N-1}]: the first step is a
    two-evaluation (Heun-like) step from t0 to t1; every later step is one evaluation. Each update goes from
    t to t - T // N. The first step's second update goes from t1 + T // N to t1.
    """
    ac = alphas_cumprod(config, clamp_zero_snr=True)
    ts = spaced_timesteps(config, n, integer=True)
    ratio = config.num_train_timesteps // n
    final = _final_alpha(config, ac)

    def alpha(t: np.ndarray) -> np.ndarray:
        return np.where(t >= 0, ac[np.clip(t, 0, len(ac) - 1)], final)

    t_next = np.append(ts[1:], 0)
    loop = np.concatenate([ts[:1], ts[1:2], ts[1:]]) if n > 1 else ts
    return _schedule(sampler, config, timesteps=ts, init_noise_sigma=1.0, loop_timesteps=loop,
                     alphas=alpha(ts), alphas_prev=alpha(ts - ratio), t_next=t_next,
                     alphas_2=alpha(t_next + ratio), alphas_2_prev=alpha(t_next),
                     **_vp_scales(np.append(ac[ts], final)))


def lcm_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """LCMScheduler: N timesteps skipped evenly through its original_inference_steps-point schedule."""
    original = config.original_inference_steps
    if not 1 <= original <= config.num_train_timesteps:
        raise ConfigError(f"original_inference_steps={original} must be between 1 and num_train_timesteps")
    origin = np.arange(1, original + 1) * (config.num_train_timesteps // original) - 1
    if n > len(origin):
        raise ValueError(f"lcm: num_steps={n} is more than original_inference_steps={original}")
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    ts = origin[::-1][idx]
    ac = alphas_cumprod(config)
    a = ac[ts]
    a_prev = np.append(a[1:], a[-1])  # the last step returns its x0 estimate; a_prev is unused there
    scaled = ts * config.timestep_scaling
    c_skip = 0.25 / (scaled**2 + 0.25)  # sigma_data = 0.5
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    final = _final_alpha(config, ac)
    return _schedule(sampler, config, timesteps=ts, init_noise_sigma=1.0, alphas=a, alphas_prev=a_prev,
                     c_skip=c_skip, c_out=c_out, **_vp_scales(np.append(a, final)))


# DPM-Solver / UniPC: timestep-space latents, but their own timesteps and sigma-space (karras, ...) schedules.


def multistep_schedule(sampler: str, config: SchedulerConfig, n: int, kind: str) -> Schedule:
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler timesteps and sigmas."""
    ac = alphas_cumprod(config, clamp_zero_snr=True)
    train = train_sigmas(ac)
    log_train = np.log(train)
    last_t = config.num_train_timesteps
    if sampler != "unipc":  # UniPC has no lambda_min_clipped
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last_t -= int(np.searchsorted(lambda_t[::-1], config.lambda_min_clipped))
    ts = multistep_timesteps(config, n, last_timestep=last_t)
    if kind == "default":
        sig = np.interp(ts, np.arange(len(train)), train)
        sigma_min_final = float(train[0])
    else:
        sig = convert_sigmas(kind, train[::-1], n)
        ts = sigma_to_t(sig, log_train)
        if kind == "karras" and config.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)  # diffusers casts to int64 (truncating the unrounded exponential ones)
        sigma_min_final = float(sig[-1]) if sampler == "unipc" else float(train[0])
    last = sigma_min_final if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = _f32(np.append(sig, last))
    signal, noise = sigma_to_alpha_sigma(sigmas)
    return _schedule(sampler, config, timesteps=ts, sigmas=sigmas, signal_scale=signal, noise_scale=noise,
                     init_noise_sigma=1.0)
