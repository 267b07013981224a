"""Reading diffusers folders: moved to :mod:`sdjax.loaders.diffusers_folder`; this import path stays."""

from sdjax.loaders.diffusers_folder import (  # noqa: F401
    MODEL_CLASSES,
    SKIPPED_COMPONENTS,
    pipeline_components,
    read_component_weights,
    read_model_index,
)
