"""sdjax: Stable Diffusion (SD 1.x, SD 2.x, SDXL) in JAX/Flax."""

from sdjax import _xla_flags

_xla_flags.apply()

__version__ = "0.1.0"
