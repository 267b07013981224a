"""Estimates of a LOADED pipeline's peak activations (UNet attention, VAE decode, tiled or not) and check_fits.
(sdjax.memory is the lower bound the CLI checks before loading.)

How much memory a generation request needs, estimated before anything is allocated, so that an impossible
size fails at once with a clear message instead of after a long compile with an allocation traceback.

The estimate counts activations (params are already loaded and not counted): the UNet's skip connections plus
its largest working set at the latent size (the transformer's feed-forward and, where the attention is not
blockwise, self-attention's ``tokens x tokens`` scores; see :mod:`sdjax.models.attention` for which
implementation runs at which length), and the VAE decoder's working set at pixel size (or one tile's, when
decoding tiled). The UNet and the VAE run in separate compiled calls, so the larger of the two counts. It is an
estimate of XLA's peak, within a small factor (``tests/test_memory.py`` compares it with XLA's own
``memory_analysis`` on small models), meant to refuse sizes that cannot fit, not to budget to the last byte.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.models import attention as attn

# Slack for buffers the count leaves out (XLA's temporaries, fusion outputs, the host copies).
_SLACK = 1.5


def _itemsize(dtype: Any) -> int:
    return jnp.dtype(dtype).itemsize


def _attention_bytes(batch: int, tokens: int, keys: int, heads: int, head_dim: int, dtype: Any,
                     forced: str | None) -> int:
    """Score memory of one attention call, by the implementation sdjax's attention() would pick."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    impl = forced
    if impl is None:
        if half and jax.default_backend() == "gpu" and head_dim <= 128:
            impl = "cudnn"
        elif keys >= attn.BLOCKWISE_MIN_KEYS:
            impl = "blockwise"
        else:
            impl = "xla"
    if impl == "cudnn":
        return 0  # flash attention: no score matrix
    if impl == "blockwise":
        # lax.map over query blocks, scan over key blocks: one block of scores (and its exp) at a time.
        return 2 * batch * heads * min(attn.QUERY_BLOCK, tokens) * min(attn.KEY_BLOCK, keys) * 4
    return 2 * batch * heads * tokens * keys * 4  # float32 scores and probabilities


def unet_bytes(pipe: Any, batch: int, height: int, width: int, *, guidance: bool = True,
               context_tokens: int = 77) -> int:
    """Activation memory of one UNet call at ``height`` x ``width`` pixels (classifier-free guidance doubles
    the batch the UNet sees)."""
    unet = pipe.unet
    cfg = unet.config
    b = batch * (2 if guidance else 1)
    f = pipe.vae_scale_factor
    h, w = -(-height // f), -(-width // f)
    size = _itemsize(unet.matmul_dtype or unet.dtype)
    skips = 0
    peak = 0
    attends = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    for i, channels in enumerate(cfg.block_out_channels):
        hi, wi = -(-h // 2**i), -(-w // 2**i)
        tokens = hi * wi
        fmap = b * tokens * channels * size
        skips += (cfg.layers[i] + 1) * fmap  # resnet outputs kept for the up path, plus the downsampled one
        # A resnet in the up path: its concatenated input (2C), norm, conv and residual.
        work = 5 * fmap
        at_level = attends[i] or i == cfg.num_blocks - 1  # the mid block always attends
        if at_level:
            heads = cfg.heads[i]
            # GEGLU's (value, gate) projection is 8C wide; plus q, k, v and the residual stream.
            work = max(work, b * tokens * (8 + 4) * channels * size)
            work += _attention_bytes(b, tokens, tokens, heads, channels // heads, unet.dtype, unet.attention_impl)
            work += _attention_bytes(b, tokens, context_tokens, heads, channels // heads, unet.dtype,
                                     unet.attention_impl)
        peak = max(peak, work)
    return int(_SLACK * (skips + peak))


def vae_decode_bytes(pipe: Any, batch: int, height: int, width: int, *, tile: int | None = None) -> int:
    """Activation memory of decoding ``batch`` images of ``height`` x ``width`` pixels; ``tile`` (latents): of
    one tile of a tiled decode, plus the blended output."""
    vae = pipe.vae
    cfg = vae.config
    f = cfg.downsample_factor
    size = _itemsize(vae.dtype)
    out = 2 * batch * height * width * cfg.out_channels * 4  # the output and its copy on the host
    if tile is not None:
        height = width = tile * f
    h, w = -(-height // f), -(-width // f)
    levels = len(cfg.block_out_channels)
    peak = 0
    for i, channels in enumerate(cfg.block_out_channels[::-1]):
        scale = 2**i  # the decoder's up block i runs at 2^i times the latent size ...
        wider = cfg.block_out_channels[::-1][i - 1] if i else channels  # ... on the previous block's upsample
        fmap = batch * h * scale * w * scale * max(channels, wider) * size
        peak = max(peak, 4 * fmap)  # input, norm, conv and residual of a resnet
        if i == levels - 1:
            break
    tokens = h * w
    c = cfg.block_out_channels[-1]
    if cfg.mid_block_add_attention:
        peak = max(peak, 4 * batch * tokens * c * size + _attention_bytes(batch, tokens, tokens, 1, c, vae.dtype, None))
    return int(_SLACK * peak) + out


def estimate_bytes(pipe: Any, batch: int, height: int, width: int, *, guidance: bool = True,
                   vae_tile: int | None = None, context_tokens: int = 77) -> int:
    """Bytes of activation memory a ``batch`` x ``height`` x ``width`` generation needs at its peak: the larger
    of one UNet call (``guidance``: with classifier-free guidance) and the VAE decode (``vae_tile``: decoded
    in tiles of that many latents), plus the latents. Params are not counted (they are loaded already)."""
    f = pipe.vae_scale_factor
    # The latents, the sampler's state and the noise: a few latent-sized float32 arrays.
    latents = 4 * batch * -(-height // f) * -(-width // f) * pipe.unet.config.out_channels * 4
    return max(unet_bytes(pipe, batch, height, width, guidance=guidance, context_tokens=context_tokens),
               vae_decode_bytes(pipe, batch, height, width, tile=vae_tile)) + latents


def available_bytes(device: Any = None) -> tuple[int | None, str]:
    """(free bytes, where) on ``device`` (default: the first JAX device): an accelerator's ``memory_stats``
    (limit minus in use), or the host's MemAvailable for the CPU backend. ``None`` when unknown."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind}"
    return _host_available(), "the host (MemAvailable)"


def _host_available() -> int | None:
    free = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    # In a container, the cgroup (v2) limit can be far below what the host has free.
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    try:
        if limit.exists() and used.exists() and limit.read_text().strip() != "max":
            free = min(free, int(limit.read_text()) - int(used.read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_fits(pipe: Any, batch: int, height: int, width: int, *, available: int | None = None,
               **options: Any) -> int:
    """Raise ValueError naming ``height`` and ``width`` when :func:`estimate_bytes` exceeds the free memory
    (``available`` bytes, default: :func:`available_bytes`); else return the estimate. ``options`` go to
    :func:`estimate_bytes`. Nothing is allocated."""
    need = estimate_bytes(pipe, batch, height, width, **options)
    where = "the given budget"
    if available is None:
        available, where = available_bytes()
    if available is not None and need > available:
        raise ValueError(
            f"height={height}, width={width} (batch {batch}) needs about {_gib(need)} of memory for activations, "
            f"but {_gib(available)} is free on {where}; choose a smaller height/width or batch"
            + ("" if options.get("vae_tile") else ", or decode the VAE tiled"))
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.0f} MiB"
