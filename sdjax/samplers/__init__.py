"""Sigma schedules and samplers: pure functions over a denoiser, run by one ``lax.fori_loop``.

Each sampler reproduces a diffusers scheduler (``SAMPLER_INFO`` has the table):

=============  ====================================================================  ==============
sdjax          diffusers                                                             A1111
=============  ====================================================================  ==============
euler          EulerDiscreteScheduler                                                Euler
euler_a        EulerAncestralDiscreteScheduler                                       Euler a
heun           HeunDiscreteScheduler                                                 Heun
dpm2           KDPM2DiscreteScheduler                                                DPM2
lms            LMSDiscreteScheduler                                                  LMS
ddim           DDIMScheduler                                                         DDIM
ddpm           DDPMScheduler                                                         (none)
pndm           PNDMScheduler(skip_prk_steps=True)                                    PLMS
dpmpp_2m       DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", order 2)    DPM++ 2M
dpmpp_2m_sde   DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")         DPM++ 2M SDE
dpmpp_sde      DPMSolverSDEScheduler                                                 DPM++ SDE
unipc          UniPCMultistepScheduler                                               UniPC
lcm            LCMScheduler                                                          LCM
=============  ====================================================================  ==============

Sigma schedules: "karras" = use_karras_sigmas=True (A1111 "... Karras"), "exponential" =
use_exponential_sigmas=True.
"""

from sdjax.samplers.denoiser import Denoiser
from sdjax.samplers.loop import (
    add_noise,
    denoising_end_step,
    denoising_start_step,
    img2img_start_step,
    inpaint_post_step,
    sample,
)
from sdjax.samplers.registry import (
    SAMPLER_INFO,
    SAMPLERS,
    SIGMA_SCHEDULE_INFO,
    get_sampler,
    make_schedule,
    resolve_config,
)
from sdjax.samplers.schedules import SIGMA_SCHEDULES, Schedule, SchedulerConfig

__all__ = [
    "SAMPLERS", "SAMPLER_INFO", "SIGMA_SCHEDULES", "SIGMA_SCHEDULE_INFO", "Denoiser", "Schedule",
    "SchedulerConfig", "add_noise", "denoising_end_step", "denoising_start_step", "get_sampler",
    "img2img_start_step", "inpaint_post_step", "make_schedule", "resolve_config", "sample",
]
