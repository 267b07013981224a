"""Peak host memory of one VAE decode, tiled vs untiled, on the CPU: the embedded default model's VAE (4 levels,
16-64 channels, 8x downsampling), random latents.

    python benchmarks/tiled_vae_memory.py [--size 2048] [--tile 64] [--batch 1] [--modes tiled untiled]

Each mode runs in a fresh subprocess; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is read after loading the
model and compiling a small decode (the baseline) and again after the big decode (the peak). Prints one line
per mode, plus sdjax.memory's estimates for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, size: int, tile: int, batch: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sdjax
    from sdjax.activation_memory import vae_decode_bytes
    from sdjax.models.vae import AutoencoderKL
    from sdjax.tiled_vae import decode_tiled

    pipe = sdjax.load()
    vae, params = pipe.vae, pipe.params["vae"]
    f = vae.config.downsample_factor
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
    np.asarray(decode(params, jnp.zeros((1, 8, 8, 4))))
    baseline = _maxrss_mib()
    latents = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size // f, size // f, 4), np.float32))
    start = time.perf_counter()
    if mode == "tiled":
        images = decode_tiled(vae, params, latents, tile=tile)
    else:
        images = decode(params, latents)
    images = np.asarray(images)
    seconds = time.perf_counter() - start
    estimate = vae_decode_bytes(pipe, batch, size, size, tile=tile if mode == "tiled" else None) / 2**20
    print(json.dumps({"mode": mode, "size": size, "batch": batch, "tile": tile if mode == "tiled" else None,
                      "baseline_mib": round(baseline), "peak_mib": round(_maxrss_mib()),
                      "estimate_mib": round(estimate), "seconds": round(seconds, 1),
                      "shape": list(images.shape), "finite": bool(np.isfinite(images).all())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=64, help="latents per tile (512 pixels, SD 1.x's default)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=["tiled", "untiled"], default=["tiled", "untiled"])
    parser.add_argument("--child", choices=["tiled", "untiled"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.tile, args.batch)
        return
    for mode in args.modes:
        result = subprocess.run([sys.executable, __file__, "--child", mode, "--size", str(args.size), "--tile",
                                 str(args.tile), "--batch", str(args.batch)], capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else f"{mode}: failed (exit {result.returncode})\n{result.stderr[-2000:]}")


if __name__ == "__main__":
    main()
