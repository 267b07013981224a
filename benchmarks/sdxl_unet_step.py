"""One SDXL UNet step at 1024x1024 (128x128 latents), batch 2, fp32 on the CPU: sdjax vs diffusers PyTorch,
same random weights, same inputs, in one process.

    python benchmarks/sdxl_unet_step.py [--size 128] [--batch 2] [--repeats 2]

Needs ~25 GB RAM (two copies of the 2.6 B fp32 weights, ~10 GB each, plus activations at 128x128): not run on
the 24 GiB shared development host. Median of ``--repeats`` after one warm-up each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "sdjax" / "assets" / "configs" / "sdxl" / "unet" / "config.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import sdjax  # noqa: F401, I001  (XLA flags before jax starts)
    import jax
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from sdjax.convert.unet import convert_unet
    from sdjax.models.unet import UNet2DConditionModel, UNetConfig

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    raw = json.loads(CONFIG.read_text())
    torch_unet = TorchUNet.from_config(raw).eval()
    config = UNetConfig.from_dict(raw)
    params = jax.tree.map(jax.numpy.asarray,
                          convert_unet({k: v.numpy() for k, v in torch_unet.state_dict().items()}, config))
    model = UNet2DConditionModel(config)
    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    x = rng.standard_normal((b, s, s, 4), dtype=np.float32)
    t = np.linspace(999.0, 1.5, b, dtype=np.float32)
    ctx = rng.standard_normal((b, 77, 2048), dtype=np.float32)
    text_embeds = rng.standard_normal((b, 1280), dtype=np.float32)
    time_ids = np.tile(np.asarray([[s * 8, s * 8, 0, 0, s * 8, s * 8]], np.float32), (b, 1))
    step = jax.jit(lambda p, x, t, c, te, ti: model.apply({"params": p}, x, t, c, text_embeds=te, time_ids=ti))
    added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    tin = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(ctx))

    def run_jax():
        return np.asarray(step(params, x, t, ctx, text_embeds, time_ids))

    def run_torch():
        with torch.inference_mode():
            return torch_unet(*tin, added_cond_kwargs=added).sample.numpy().transpose(0, 2, 3, 1)

    a, ref = run_jax(), run_torch()
    jt, tt = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_jax()
        jt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_torch()
        tt.append(time.perf_counter() - t0)
    j, tm = statistics.median(jt), statistics.median(tt)
    print(f"SDXL UNet step, batch {b}, {s}x{s} latents, fp32: sdjax {j:.1f} s, pytorch {tm:.1f} s, "
          f"ratio sdjax/pytorch = {j / tm:.2f} (max |diff| {float(np.abs(a - ref).max()):.1e})")


if __name__ == "__main__":
    main()
