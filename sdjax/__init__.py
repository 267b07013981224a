"""sdjax: Stable Diffusion (SD 1.x, SD 2.x, SDXL) in JAX/Flax."""

from sdjax import _xla_flags

_xla_flags.apply()

__version__ = "0.1.0"

__all__ = ["Pipeline", "load", "load_controlnet", "load_ip_adapter", "load_t2i_adapter", "merge", "presets",
           "__version__"]

# Add-on loaders, by the module that holds each (imported on first use as well).
_ADDONS = {"load_controlnet": "sdjax.control", "load_t2i_adapter": "sdjax.t2i_adapter",
           "load_ip_adapter": "sdjax.ip_adapter"}


def __getattr__(name: str):
    # Imported on first use: `import sdjax` stays light (no model code, no transformers) until needed.
    if name == "Pipeline":
        from sdjax.pipeline import Pipeline

        return Pipeline
    if name == "load":
        from sdjax.loaders import load

        return load
    if name == "merge":
        from sdjax.loaders.merge import merge

        return merge
    if name == "presets":
        import sdjax.presets

        return sdjax.presets
    if name in _ADDONS:
        import importlib

        return getattr(importlib.import_module(_ADDONS[name]), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
