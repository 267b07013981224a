"""VAE decode of a 64x64 latent to 512x512 pixels on the CPU: sdjax (jit) vs diffusers PyTorch, same random
weights (SD1.5's VAE config), same latents, in one process, each framework alone (see ``_timing``).

    python benchmarks/vae_decode.py [--batch 1] [--size 64] [--repeats 3]

Median of ``--repeats`` after one warm-up each; prints the ratio and the max difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIG = Path(__file__).resolve().parents[1] / "sdjax" / "assets" / "configs" / "sd1" / "vae" / "config.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import sdjax  # noqa: F401, I001  (XLA flags before jax starts)
    import jax
    import numpy as np
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from sdjax.convert.vae import convert_vae
    from sdjax.generation.core import decode_latents
    from sdjax.models.vae import AutoencoderKL, VAEConfig
    from _timing import median_times

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    raw = json.loads(CONFIG.read_text())
    torch_vae = TorchVAE.from_config(raw).eval()
    config = VAEConfig.from_dict(raw)
    params = jax.tree.map(jax.numpy.asarray,
                          convert_vae({k: v.numpy() for k, v in torch_vae.state_dict().items()}, config))
    vae = AutoencoderKL(config)
    decode = jax.jit(lambda p, z: decode_latents(vae, p, z))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((args.batch, args.size, args.size, 4), dtype=np.float32)
    tz = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()) / config.scaling_factor

    def run_jax():
        return np.asarray(decode(params, z))

    def run_torch():
        with torch.inference_mode():
            return (torch_vae.decode(tz).sample / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)

    medians, outputs = median_times({"sdjax": run_jax, "torch": run_torch}, args.repeats)
    j, tm = medians["sdjax"], medians["torch"]
    a, b = outputs["sdjax"], outputs["torch"]
    print(f"VAE decode {args.size}x{args.size} latent -> {8 * args.size}x{8 * args.size}, batch {args.batch}, fp32: "
          f"sdjax {j:.2f} s, pytorch {tm:.2f} s, ratio sdjax/pytorch = {j / tm:.2f} "
          f"(max |diff| {float(np.abs(a - b).max()):.1e})")


if __name__ == "__main__":
    main()
