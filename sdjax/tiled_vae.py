"""Tiled VAE decode and encode: overlapping tiles, each run through the VAE alone, linearly blended.

The scheme is diffusers' ``AutoencoderKL.tiled_decode`` / ``_tiled_encode`` exactly, so the same tile settings
give the same images: tiles of ``tile`` latents (``tile * f`` pixels) start every ``tile - tile * overlap``
latents; each tile is blended with the (already blended) tile above and then the one to its left over
``tile * overlap`` latents' worth of rows/columns, with weights ramping linearly across the overlap; then cropped
to its stride. Edge tiles are cut short by the image border, as in diffusers.

Only one tile's activations exist at a time (a Python loop over a jitted per-tile function: one compile per
tile shape, at most four shapes per image size), plus the blended output, so a 2048x2048 decode needs memory
for one tile, not for the whole image (``benchmarks/tiled_vae_memory.py`` measures it: 687 MiB peak RSS vs
2,326 MiB untiled for the default model). A ``lax.map`` over stacked tiles bounds memory as well (XLA plans
28 MiB of temporaries for 4 or 16 tiles of 32 latents alike) but needs tiles of one shape, and diffusers cuts
the edge tiles short; the loop also lets each tile blend into the already blended ones, as diffusers does.

:func:`decode_latents` / :func:`encode_pixels` are the pipeline's view: diffusion-model latents <-> [0, 1]
pixels, tiled when :func:`should_tile` says so.
Tiles see only their own part of the image (group norm statistics and the mid-block attention are per tile), so
the result is close to, not equal to, an untiled decode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.vae import AutoencoderKL, VAEConfig, posterior, sample_latent, scale_latents, unscale_latents

# Images with more pixels than this side squared decode tiled when the caller asks should_tile (SDXL's
# 1024x1024 and its aspect buckets stay untiled, as diffusers decodes them; 2048x2048 tiles).
DEFAULT_TILE_THRESHOLD = 1536
DEFAULT_OVERLAP = 0.25  # diffusers' tile_overlap_factor


def should_tile(height: int, width: int, threshold: int | None = DEFAULT_TILE_THRESHOLD) -> bool:
    """Whether a ``height`` x ``width`` (pixels) image should be decoded tiled: it has more pixels than
    ``threshold ** 2``. ``threshold=None`` never tiles; ``0`` always does."""
    if threshold is None:
        return False
    return height * width > threshold * threshold


def default_tile(config: VAEConfig) -> int:
    """diffusers' ``tile_latent_min_size``: the config's ``sample_size`` in latents (64 for SD 1.x's VAE,
    128 for SDXL's)."""
    size = config.sample_size[0] if isinstance(config.sample_size, (tuple, list)) else config.sample_size
    return int(size / config.downsample_factor)


def _blend_extent(tile: int, overlap: float, what: str) -> int:
    """The overlap in latents, checked: it must be whole, or the crops would not add up to the image."""
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile={tile!r} must be a positive number of latents")
    if not 0.0 <= overlap <= 0.5:
        raise ValueError(f"overlap={overlap!r} must be a fraction of the tile between 0 and 0.5")
    blend = tile * overlap
    if abs(blend - round(blend)) > 1e-9:
        raise ValueError(f"{what}: tile={tile} times overlap={overlap} is {blend:g} latents; it must be a whole "
                         f"number (e.g. overlap=0.25 with a tile divisible by 4)")
    return round(blend)


def _blend_rows(above: np.ndarray, tile: np.ndarray, extent: int) -> np.ndarray:
    """diffusers' ``blend_v`` (NHWC): the first rows of ``tile`` fade in from the last rows of ``above``."""
    extent = min(above.shape[1], tile.shape[1], extent)
    if extent:
        w = (np.arange(extent, dtype=np.float32) / extent)[None, :, None, None]
        tile[:, :extent] = above[:, -extent:] * (1 - w) + tile[:, :extent] * w
    return tile


def _blend_columns(left: np.ndarray, tile: np.ndarray, extent: int) -> np.ndarray:
    """diffusers' ``blend_h`` (NHWC): the first columns of ``tile`` fade in from the last columns of ``left``."""
    extent = min(left.shape[2], tile.shape[2], extent)
    if extent:
        w = (np.arange(extent, dtype=np.float32) / extent)[None, None, :, None]
        tile[:, :, :extent] = left[:, :, -extent:] * (1 - w) + tile[:, :, :extent] * w
    return tile


def _tiled(run: Callable[[np.ndarray], jax.Array], x: np.ndarray, in_tile: int, in_stride: int, out_blend: int,
           out_limit: int) -> np.ndarray:
    """Run ``run`` on overlapping ``in_tile`` tiles of NHWC ``x`` and blend the results as diffusers does.

    Slicing and blending happen in NumPy on the host: eager JAX would compile a small program for every
    distinct slice offset and blend width."""
    rows: list[np.ndarray] = []
    previous: list[np.ndarray] = []
    for i in range(0, x.shape[1], in_stride):
        row: list[np.ndarray] = []
        for j in range(0, x.shape[2], in_stride):
            out = np.array(run(x[:, i:i + in_tile, j:j + in_tile]), np.float32)  # a writable host copy
            if previous:
                out = _blend_rows(previous[len(row)], out, out_blend)
            if row:
                out = _blend_columns(row[-1], out, out_blend)
            row.append(out)
        rows.append(np.concatenate([t[:, :out_limit, :out_limit] for t in row], axis=2))
        previous = row
    return np.concatenate(rows, axis=1)


@functools.lru_cache(maxsize=8)
def _tile_decoder(vae: AutoencoderKL) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(lambda params, z: vae.apply({"params": params}, z, method=AutoencoderKL.decode))


@functools.lru_cache(maxsize=8)
def _tile_encoder(vae: AutoencoderKL) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(lambda params, x: vae.apply({"params": params}, x, method=AutoencoderKL.encode_moments))


def decode_tiled(vae: AutoencoderKL, params: Any, latents: jax.Array, *, tile: int | None = None,
                 overlap: float = DEFAULT_OVERLAP) -> np.ndarray:
    """``vae.decode`` in overlapping tiles: unscaled latents ``(B, h, w, C)`` -> images ``(B, h*f, w*f, out)``
    (a float32 NumPy array, [-1, 1] like ``decode``). ``tile``: tile size in latents (default diffusers', from
    the config's ``sample_size``); ``overlap``: the fraction of a tile shared with each neighbour (``tile *
    overlap`` must be whole). ``params``: the VAE's params."""
    f = vae.config.downsample_factor
    tile = default_tile(vae.config) if tile is None else tile
    blend = _blend_extent(tile, overlap, "decode_tiled")
    latents = np.asarray(latents)
    if latents.ndim != 4 or latents.shape[-1] != vae.config.latent_channels:
        raise ValueError(f"decode_tiled: latents must be NHWC (batch, h, w, {vae.config.latent_channels}); got "
                         f"shape {tuple(latents.shape)}")
    decoder = _tile_decoder(vae)
    return _tiled(lambda z: decoder(params, z), latents, tile, tile - blend, blend * f, (tile - blend) * f)


def encode_tiled_moments(vae: AutoencoderKL, params: Any, images: jax.Array, *, tile: int | None = None,
                         overlap: float = DEFAULT_OVERLAP) -> np.ndarray:
    """``vae.encode_moments`` in overlapping tiles (diffusers' ``_tiled_encode``): images ``(B, H, W, in)`` in
    [-1, 1] -> raw moments ``(B, H/f, W/f, 2 * latent_channels)``. ``tile`` is in latents (``tile * f`` pixels)."""
    cfg = vae.config
    f = cfg.downsample_factor
    tile = default_tile(cfg) if tile is None else tile
    blend = _blend_extent(tile, overlap, "encode_tiled")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels or images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"encode_tiled: images must be NHWC (batch, H, W, {cfg.in_channels}) with H and W multiples "
                         f"of {f}; got shape {tuple(images.shape)}")
    encoder = _tile_encoder(vae)
    return _tiled(lambda x: encoder(params, x), images, tile * f, (tile - blend) * f, blend, tile - blend)


def encode_tiled(vae: AutoencoderKL, params: Any, images: jax.Array, *, tile: int | None = None,
                 overlap: float = DEFAULT_OVERLAP) -> tuple[jax.Array, jax.Array]:
    """``vae.encode`` in overlapping tiles: images in [-1, 1] -> the posterior's ``(mean, logvar)``, blended
    before logvar is clipped (as diffusers does). Arguments as :func:`decode_tiled`."""
    return posterior(jnp.asarray(encode_tiled_moments(vae, params, images, tile=tile, overlap=overlap)))


@functools.lru_cache(maxsize=8)
def _whole_decoder(vae: AutoencoderKL) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(lambda params, z: vae.apply({"params": params}, z, method=AutoencoderKL.decode))


@functools.lru_cache(maxsize=8)
def _whole_encoder(vae: AutoencoderKL) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(lambda params, x: vae.apply({"params": params}, x, method=AutoencoderKL.encode_moments))


def decode_latents(vae: AutoencoderKL, params: Any, latents: jax.Array, *,
                   threshold: int | None = DEFAULT_TILE_THRESHOLD, tile: int | None = None,
                   overlap: float = DEFAULT_OVERLAP) -> jax.Array:
    """Diffusion-model latents ``(B, h, w, C)`` (scaled, as the sampler leaves them) -> images ``(B, H, W, 3)``
    float32 in [0, 1]: unscaled, decoded (in tiles when ``should_tile(H, W, threshold)``), clipped."""
    z = unscale_latents(jnp.asarray(latents, jnp.float32), vae.config).astype(vae.dtype)
    f = vae.config.downsample_factor
    if should_tile(z.shape[1] * f, z.shape[2] * f, threshold):
        pixels = jnp.asarray(decode_tiled(vae, params, z, tile=tile, overlap=overlap))
    else:
        pixels = _whole_decoder(vae)(params, z)
    return jnp.clip(pixels.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


def encode_pixels(vae: AutoencoderKL, params: Any, pixels: jax.Array, *, key: jax.Array | None = None,
                  threshold: int | None = DEFAULT_TILE_THRESHOLD, tile: int | None = None,
                  overlap: float = DEFAULT_OVERLAP) -> jax.Array:
    """Images ``(B, H, W, 3)`` in [0, 1] -> diffusion-model latents (scaled): the posterior's mean, or a sample
    from it with ``key``; encoded in tiles when ``should_tile(H, W, threshold)``."""
    x = jnp.asarray(pixels, jnp.float32) * 2.0 - 1.0
    if should_tile(x.shape[1], x.shape[2], threshold):
        moments = jnp.asarray(encode_tiled_moments(vae, params, x, tile=tile, overlap=overlap))
    else:
        moments = _whole_encoder(vae)(params, x.astype(vae.dtype))
    mean, logvar = posterior(moments)
    z = mean if key is None else sample_latent(mean, logvar, key)
    return scale_latents(z, vae.config)
