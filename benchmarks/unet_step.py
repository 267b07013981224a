"""One SD1.5 UNet step on the CPU: sdjax (jit) vs diffusers/PyTorch, same random weights, same inputs.

    python benchmarks/unet_step.py [--repeats 3] [--batch 2] [--size 64] [--attention auto|xla|blockwise]
                                   [--dtype float32|bfloat16] [--alternate]

Both are timed in the same process, each alone (``--alternate``: round-robin; see ``_timing``), median of
``--repeats`` after one warm-up each. Prints both
times, the ratio sdjax/PyTorch, sdjax's compile time and the max abs difference of the outputs (a sanity check).
Needs ~10 GB RAM (two copies of the 860M fp32 weights plus activations).

``--dtype bfloat16`` (opt-in, not fp32 parity): weights stay float32; every Dense layer (attention projections,
feed-forward, proj_in/out, shortcuts, time embedding) and the attention einsums take bfloat16 inputs and
accumulate in float32, which PERF_NOTES measured as the one CPU lever (convolutions gain nothing from bf16). It
also narrows the XLA flag to ``-individual_convolution`` so YNNPACK keeps the bf16 dots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--attention", choices=("auto", "xla", "blockwise"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: bf16-input / f32-accumulate matmuls in sdjax (PyTorch stays fp32)")
    p.add_argument("--skip-torch", action="store_true", help="time sdjax only")
    p.add_argument("--alternate", action="store_true",
                   help="alternate sdjax's and PyTorch's runs (default: all of sdjax's, then all of PyTorch's)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.dtype == "bfloat16" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_experimental_ynn_fusion_type=-individual_convolution").strip()

    import sdjax  # noqa: F401, I001  (sets the XLA CPU flags before jax starts)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from sdjax.convert.unet import convert_unet
    from sdjax.models.unet import UNet2DConditionModel, UNetConfig
    from _timing import median_times

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({threads} threads); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    print(f"SD1.5 UNet, batch {args.batch}, {args.size}x{args.size} latents, {args.tokens} tokens, "
          f"sdjax {args.dtype}, attention {args.attention}", flush=True)

    t0 = time.perf_counter()
    torch_unet = TorchUNet(**{k: v for k, v in SD15_UNET_CONFIG.items() if not k.startswith("_")}).eval()
    config = UNetConfig.from_dict(SD15_UNET_CONFIG)
    state = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert_unet(state, config))
    del state
    print(f"built and converted in {time.perf_counter() - t0:.1f}s", flush=True)

    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    sample = rng.standard_normal((b, 4, s, s), dtype=np.float32)
    timesteps = np.linspace(999.0, 1.5, b, dtype=np.float32)
    context = rng.standard_normal((b, args.tokens, 768), dtype=np.float32)
    torch_in = (torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
    jax_in = (jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(context))

    model = UNet2DConditionModel(
        config, attention_impl=None if args.attention == "auto" else args.attention,
        matmul_dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None)
    t0 = time.perf_counter()
    step = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)).lower(params, *jax_in).compile()
    compile_s = time.perf_counter() - t0
    print(f"sdjax compile: {compile_s:.1f}s", flush=True)

    def run_jax() -> np.ndarray:
        return np.asarray(step(params, *jax_in))

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return torch_unet(*torch_in).sample.numpy().transpose(0, 2, 3, 1)

    runs = {"sdjax": run_jax} if args.skip_torch else {"sdjax": run_jax, "torch": run_torch}
    medians, outputs = median_times(runs, args.repeats, alternate=args.alternate)
    tj = medians["sdjax"]
    print(f"sdjax   {tj:.2f} s/step (median of {args.repeats}; compile {compile_s:.1f}s)")
    if not args.skip_torch:
        tt, ref = medians["torch"], outputs["torch"]
        err = float(np.abs(outputs["sdjax"].astype(np.float32) - ref).max())
        print(f"pytorch {tt:.2f} s/step (median of {args.repeats})")
        print(f"ratio sdjax/pytorch = {tj / tt:.2f}")
        print(f"max |sdjax - pytorch| = {err:.2e} (max |pytorch| = {float(np.abs(ref).max()):.3g})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
