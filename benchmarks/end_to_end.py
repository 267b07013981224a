"""End to end on the CPU: text encoding + 20-step Euler loop with CFG 7.5 + VAE decode, SD1.5 full-size config
with random weights, sdjax vs diffusers PyTorch in the same process on the same weights, warm.

    python benchmarks/end_to_end.py [--size 512] [--steps 20] [--batch 1] [--repeats 1] [--folder /tmp/sd15]

sdjax's first call (the compile) is its warm-up; PyTorch warms up with a 2-step call. Each framework then runs
``--repeats`` times alone (median; ``_timing``). Also prints the phases (text encoding, one UNet step, decode)
timed separately (one untimed call each, then the median of 3), to show what dominates. Needs ~12 GB RAM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "sdjax_bench_sd15")
    args = p.parse_args()

    import sdjax  # noqa: I001  (XLA flags before jax starts)
    import jax
    import numpy as np
    import torch

    from _models import build_pipeline, saved
    from _timing import median_times

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} threads; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"SD1.5 config, random weights, {args.size}x{args.size}, {args.steps} Euler steps, CFG 7.5, "
          f"batch {args.batch}, fp32", flush=True)
    t = time.perf_counter()
    torch_pipe = build_pipeline("sd1")
    folder = saved(torch_pipe, args.folder)
    pipe = sdjax.load(folder)
    print(f"built, saved and loaded in {time.perf_counter() - t:.0f} s", flush=True)
    prompts = ["a photo of an astronaut riding a horse on mars"] * args.batch
    common = dict(height=args.size, width=args.size, guidance_scale=7.5)

    def run_jax(steps: int = args.steps) -> np.ndarray:
        return pipe.text_to_image(prompts, num_steps=steps, sampler="euler", seed=0, **common)

    def run_torch(steps: int = args.steps) -> np.ndarray:
        with torch.inference_mode():
            return torch_pipe(prompts, num_inference_steps=steps, output_type="np",
                              generator=torch.Generator().manual_seed(0), **common).images

    medians, _ = median_times({"sdjax": run_jax, "torch": run_torch}, args.repeats,
                             warm_ups={"torch": lambda: run_torch(2)})  # sdjax's warm-up is its compile
    j, tm = medians["sdjax"], medians["torch"]
    print(f"end to end: sdjax {j:.1f} s, pytorch {tm:.1f} s, ratio sdjax/pytorch = {j / tm:.2f}")
    phases(pipe, torch_pipe, prompts, args)


def phases(pipe, torch_pipe, prompts, args) -> None:
    """Each phase alone, both frameworks: where the end-to-end time goes."""
    import jax
    import numpy as np
    import torch
    from _timing import median_times

    from sdjax.generation import core

    b, s = 2 * args.batch, args.size // 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, s, 4), dtype=np.float32)
    ctx = rng.standard_normal((b, 77, 768), dtype=np.float32)
    ts = np.full((b,), 500.0, np.float32)
    unet = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    unet(pipe.params["unet"], x, ts, ctx).block_until_ready()
    lat = rng.standard_normal((args.batch, s, s, 4), dtype=np.float32)
    dec = core._decoder(pipe.vae)
    dec(pipe.params["vae"], lat).block_until_ready()

    with torch.inference_mode():
        tx, tts, tc = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ts), torch.from_numpy(ctx))
        tl = torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()) / torch_pipe.vae.config.scaling_factor
        calls = {
            "UNet step (CFG batch)": (lambda: unet(pipe.params["unet"], x, ts, ctx).block_until_ready(),
                                      lambda: torch_pipe.unet(tx, tts, tc)),
            "VAE decode": (lambda: dec(pipe.params["vae"], lat).block_until_ready(),
                           lambda: torch_pipe.vae.decode(tl)),
            "text encoding": (lambda: pipe.encode_prompt(prompts, [""] * len(prompts)),
                              lambda: torch_pipe.encode_prompt(prompts, "cpu", 1, True, [""] * len(prompts))),
        }
        rows = {}
        for name, (a, c) in calls.items():
            print(f"phase {name}:", flush=True)
            medians, _ = median_times({"sdjax": a, "torch": c}, 3)
            rows[name] = (medians["sdjax"], medians["torch"])
    for name, (a, c) in rows.items():
        print(f"phase {name:22s} sdjax {a:7.3f} s  torch {c:7.3f} s  ratio {a / c:.2f}")
    unet_share = rows["UNet step (CFG batch)"][0] * args.steps
    total = unet_share + rows["VAE decode"][0] + rows["text encoding"][0]
    print(f"sdjax: {args.steps} UNet steps are {unet_share / total:.0%} of the phases' sum, "
          f"decode {rows['VAE decode'][0] / total:.0%}, text {rows['text encoding'][0] / total:.0%}")


if __name__ == "__main__":
    main()
