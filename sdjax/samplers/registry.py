"""The samplers by name, what each reproduces, and the schedule each one needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from sdjax.models.config import ConfigError
from sdjax.samplers import k_diffusion, multistep, schedules, timestep
from sdjax.samplers.core import State, Step
from sdjax.samplers.schedules import Schedule, SchedulerConfig

StepFn = Callable[[Step, jax.Array, State], tuple[jax.Array, State]]
ScheduleFn = Callable[[str, SchedulerConfig, int, str], Schedule]


def _no_state(x: jax.Array) -> State:
    return ()


@dataclasses.dataclass(frozen=True)
class Sampler:
    """``step`` advances one schedule step; ``init_state`` makes the carry's history (fixed shapes)."""

    name: str
    step: StepFn
    schedule: ScheduleFn
    diffusers: str  # the diffusers scheduler (and arguments) it reproduces
    a1111: str | None  # the AUTOMATIC1111 web UI name
    init_state: Callable[[jax.Array], State] = _no_state
    stochastic: bool = False  # needs per-image keys
    default_eta: float = 0.0
    uses_eta: bool = False
    sigma_schedules: tuple[str, ...] = ("default",)  # "karras" / "exponential" where diffusers offers them
    # the diffusers class's defaults for config keys a file may leave out (see schedules.BASE_DEFAULTS)
    config_defaults: tuple[tuple[str, Any], ...] = ()
    renoise: bool = False  # re-noises with a guidance-supplied eps (CFG++)
    mean_shift: bool = False  # has an ancestral mean a classifier gradient can move (guidance algorithm 1)


_ANY_SIGMAS = schedules.SIGMA_SCHEDULES
_LEADING = (("timestep_spacing", "leading"),)
_LDM_BETAS = (("beta_start", 0.00085), ("beta_end", 0.012))

SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    Sampler("euler", k_diffusion.euler, schedules.euler_schedule, "EulerDiscreteScheduler", "Euler",
            sigma_schedules=_ANY_SIGMAS, renoise=True),
    Sampler("euler_a", k_diffusion.euler_a, schedules.euler_schedule, "EulerAncestralDiscreteScheduler",
            "Euler a", stochastic=True, default_eta=1.0, uses_eta=True, sigma_schedules=_ANY_SIGMAS, renoise=True),
    Sampler("heun", k_diffusion.heun, schedules.heun_schedule, "HeunDiscreteScheduler", "Heun",
            sigma_schedules=_ANY_SIGMAS, config_defaults=_LDM_BETAS),
    Sampler("dpm2", k_diffusion.dpm2, schedules.dpm2_schedule, "KDPM2DiscreteScheduler", "DPM2",
            sigma_schedules=_ANY_SIGMAS, config_defaults=_LDM_BETAS),
    Sampler("lms", k_diffusion.lms, schedules.lms_schedule, "LMSDiscreteScheduler", "LMS",
            init_state=k_diffusion.lms_init, sigma_schedules=_ANY_SIGMAS),
    Sampler("ddim", timestep.ddim, schedules.ddim_schedule, "DDIMScheduler (eta as its step argument)", "DDIM",
            uses_eta=True, config_defaults=(*_LEADING, ("clip_sample", True)), renoise=True),
    Sampler("ddpm", timestep.ddpm, schedules.ddpm_schedule, 'DDPMScheduler(variance_type="fixed_small")', None,
            stochastic=True, config_defaults=(*_LEADING, ("clip_sample", True)), mean_shift=True),
    Sampler("pndm", timestep.pndm, schedules.pndm_schedule, "PNDMScheduler(skip_prk_steps=True)", "PLMS",
            init_state=timestep.pndm_init, config_defaults=(*_LEADING, ("set_alpha_to_one", False))),
    Sampler("dpmpp_2m", multistep.dpmpp_2m, schedules.multistep_schedule,
            'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)', "DPM++ 2M",
            init_state=lambda x: jax.numpy.zeros_like(x, jax.numpy.float32), sigma_schedules=_ANY_SIGMAS,
            renoise=True),
    Sampler("dpmpp_2m_sde", multistep.dpmpp_2m_sde, schedules.multistep_schedule,
            'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)', "DPM++ 2M SDE",
            init_state=lambda x: jax.numpy.zeros_like(x, jax.numpy.float32), stochastic=True, default_eta=1.0,
            uses_eta=True, sigma_schedules=_ANY_SIGMAS),
    Sampler("dpmpp_sde", k_diffusion.dpmpp_sde, schedules.dpmpp_sde_schedule, "DPMSolverSDEScheduler",
            "DPM++ SDE", stochastic=True, default_eta=1.0, uses_eta=True, sigma_schedules=_ANY_SIGMAS,
            config_defaults=_LDM_BETAS),
    Sampler("unipc", multistep.unipc, schedules.multistep_schedule,
            'UniPCMultistepScheduler(solver_order=2, solver_type="bh2")', "UniPC",
            init_state=multistep.unipc_init, sigma_schedules=_ANY_SIGMAS),
    Sampler("lcm", timestep.lcm, schedules.lcm_schedule, "LCMScheduler", "LCM", stochastic=True,
            config_defaults=(*_LEADING, *_LDM_BETAS, ("beta_schedule", "scaled_linear"))),
]}

# The table the README is generated from. Sigma schedules map to diffusers' config flags:
# karras -> use_karras_sigmas=True (A1111 suffix " Karras"), exponential -> use_exponential_sigmas=True
# (" Exponential").
SAMPLER_INFO: dict[str, dict[str, Any]] = {
    s.name: {"diffusers": s.diffusers, "a1111": s.a1111, "stochastic": s.stochastic,
             "sigma_schedules": s.sigma_schedules}
    for s in SAMPLERS.values()
}
SIGMA_SCHEDULE_INFO = {
    "default": {"diffusers": "(the config's own)", "a1111": ""},
    "karras": {"diffusers": "use_karras_sigmas=True", "a1111": " Karras"},
    "exponential": {"diffusers": "use_exponential_sigmas=True", "a1111": " Exponential"},
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}") from None


def make_schedule(config: SchedulerConfig, sampler: str, num_steps: int, sigmas: str | None = None) -> Schedule:
    """The schedule ``sampler`` runs for ``num_steps`` steps, as diffusers' ``set_timesteps(num_steps)``.

    ``sigmas``: "default", "karras" or "exponential"; None takes the config's use_karras_sigmas /
    use_exponential_sigmas.
    """
    spec = get_sampler(sampler)
    kind = config.sigma_schedule if sigmas is None else schedules.check_sigma_schedule(sigmas)
    if kind not in spec.sigma_schedules:
        raise ValueError(f"sampler {sampler!r} works on diffusers' timestep grid and has no {kind!r} sigma "
                         f"schedule (samplers that do: "
                         f"{', '.join(n for n, s in SAMPLERS.items() if kind in s.sigma_schedules)})")
    config = resolve_config(config, sampler)
    schedules.check_num_steps(config, num_steps)
    return spec.schedule(sampler, config, int(num_steps), kind)


def resolve_config(config: SchedulerConfig, sampler: str) -> SchedulerConfig:
    """``config`` with the keys its file left out set as diffusers' scheduler class for ``sampler`` sets them."""
    try:
        return config.with_defaults(dict(get_sampler(sampler).config_defaults))
    except ConfigError as e:
        raise ConfigError(f"sampler {sampler!r}: {e}") from None
