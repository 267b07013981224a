"""How much memory a generation needs at least, and how much there is: to refuse absurd sizes before any work.

``estimate_bytes`` is a *lower bound* of the peak (weights plus the largest activations that must exist at
once), so refusing when it exceeds the memory available is never wrong; a request under it can still run out
(attention, XLA temporaries). Terms, per device (the batch is split over the devices, weights replicated):

- the weights (``params_bytes``: a loaded pipeline's arrays, or the files' sizes before loading);
- the UNet at latent resolution: input and output of its first conv, ``2 x block_out_channels[0] x h x w``,
  twice with classifier-free guidance (prompt and negative go through together);
- the VAE decoder at image resolution: its last upsampler's input and output, ``(ch[1] + ch[0]) x H x W``;

each image of the batch at the compute dtype's size (the VAE's own dtype for its term).
"""

from __future__ import annotations

import os
from typing import Any

# SD 1.x/2.x/SDXL all share these; used where a model's configs can't be read before loading (single files).
DEFAULT_UNET = {"block_out_channels": [320, 640, 1280, 1280]}
DEFAULT_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
_F = 8  # the VAE's downsampling factor of every SD family


def estimate_bytes(pipe_or_config: Any, batch: int, height: int, width: int, *, devices: int = 1,
                   itemsize: int = 4, cfg: bool = True) -> int:
    """A lower bound on one device's peak memory for ``batch`` images of ``height`` x ``width``.

    ``pipe_or_config``: a Pipeline, a dict ``{"unet": config, "vae": config, "params_bytes": n}`` (diffusers
    config dicts; missing entries take SD's values), or None (SD's channel counts, no weights counted).
    ``devices``: how many devices share the batch; ``itemsize``: bytes per activation value (4 for float32).
    """
    unet, vae, params, vae_itemsize = _describe(pipe_or_config, itemsize)
    per_device = -(-int(batch) // max(int(devices), 1))
    pixels = int(height) * int(width)
    latent = pixels // (_F * _F)
    unet_bytes = (2 if cfg else 1) * 2 * int(unet["block_out_channels"][0]) * latent * itemsize
    ch = list(vae["block_out_channels"])
    vae_bytes = (int(ch[0]) + int(ch[1] if len(ch) > 1 else ch[0])) * pixels * vae_itemsize
    return int(params + per_device * max(unet_bytes, vae_bytes))


def _describe(pipe_or_config: Any, itemsize: int) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    if pipe_or_config is None:
        return DEFAULT_UNET, DEFAULT_VAE, 0, itemsize
    if isinstance(pipe_or_config, dict):
        return (pipe_or_config.get("unet") or DEFAULT_UNET, pipe_or_config.get("vae") or DEFAULT_VAE,
                int(pipe_or_config.get("params_bytes", 0)), itemsize)
    import jax

    pipe = pipe_or_config
    params = sum(int(x.nbytes) for x in jax.tree.leaves(pipe.params))
    vae_itemsize = jax.numpy.dtype(pipe.vae.dtype).itemsize if getattr(pipe.vae, "dtype", None) else itemsize
    return ({"block_out_channels": pipe.unet.config.block_out_channels},
            {"block_out_channels": pipe.vae.config.block_out_channels}, params, max(vae_itemsize, 1))


def available_bytes(devices: list[Any] | None = None) -> int | None:
    """Memory one device can use: an accelerator's own limit, or the host's available RAM for CPU devices
    (None when neither can be read)."""
    if devices:
        device = devices[0]
        if getattr(device, "platform", "cpu") != "cpu":
            try:
                stats = device.memory_stats() or {}
            except Exception:  # noqa: BLE001 - some backends have no memory stats
                stats = {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_available_bytes()


def host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
