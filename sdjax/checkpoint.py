"""sdjax checkpoints and export to diffusers folders: moved to :mod:`sdjax.loaders.sdjax_format`; this import
path stays for existing code (``from sdjax.checkpoint import export_diffusers, save_checkpoint``)."""

from sdjax.loaders.sdjax_format import (  # noqa: F401
    DTYPES,
    FORMAT_VERSION,
    MARKER,
    atomic_folder,
    component_configs,
    export_diffusers,
    is_sdjax_checkpoint,
    load_checkpoint,
    save_checkpoint,
    torch_state_dict,
)
