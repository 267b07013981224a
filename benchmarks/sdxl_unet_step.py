"""One SDXL UNet step at 1024x1024 (128x128 latents), batch 2, fp32 on the CPU: sdjax vs diffusers PyTorch,
same random weights, same inputs.

    python benchmarks/sdxl_unet_step.py [--folder DIR] [--size 128] [--batch 2] [--repeats 2]

The UNet comes from a random-weight SDXL diffusers folder (written on first use, ~14 GB; ``sdxl_memory.py``
uses the same folder). One fp32 copy of its 2.6 B weights is ~10 GB, so the two frameworks' copies plus
activations do not fit a 24 GiB host together: each framework runs in its own child process, PyTorch first,
then sdjax, one after the other on an otherwise idle machine. Each child times one warm-up
and the median of ``--repeats`` (``_timing.median_times``); the sdjax child also compares its
output with PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _timing import median_times  # noqa: E402


def inputs(batch: int, size: int) -> dict:
    """Fresh random inputs (NHWC latents), the same in both children."""
    import numpy as np

    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((batch, size, size, 4), dtype=np.float32),
        t=np.linspace(999.0, 1.5, batch, dtype=np.float32),
        context=rng.standard_normal((batch, 77, 2048), dtype=np.float32),
        text_embeds=rng.standard_normal((batch, 1280), dtype=np.float32),
        time_ids=np.tile(np.asarray([[size * 8, size * 8, 0, 0, size * 8, size * 8]], np.float32), (batch, 1)),
    )


def torch_child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(args.folder / "unet", torch_dtype=torch.float32).eval()
    a = inputs(args.batch, args.size)
    sample = torch.from_numpy(a["x"].transpose(0, 3, 1, 2).copy())
    added = {"text_embeds": torch.from_numpy(a["text_embeds"]), "time_ids": torch.from_numpy(a["time_ids"])}

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = unet(sample, torch.from_numpy(a["t"]), torch.from_numpy(a["context"]), added_cond_kwargs=added)
        return out.sample.numpy()

    medians, outputs = median_times({"torch": run}, args.repeats)
    np.save(args.reference, outputs["torch"].transpose(0, 2, 3, 1))
    return {"median": medians["torch"]}


def jax_child(args: argparse.Namespace) -> dict:
    import sdjax  # noqa: F401, I001  (XLA flags before jax starts)
    import jax
    import numpy as np

    from sdjax.config import read_json
    from sdjax.convert.unet import convert_unet
    from sdjax.loaders.diffusers_folder import read_component_weights
    from sdjax.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict(read_json(args.folder / "unet" / "config.json"))
    state = read_component_weights(args.folder / "unet")
    params = jax.device_put(convert_unet(state, config))  # aligned host arrays: the CPU uses them in place
    del state
    model = UNet2DConditionModel(config)
    a = inputs(args.batch, args.size)
    t = time.perf_counter()
    step = jax.jit(lambda p, x, t, c, te, ti: model.apply({"params": p}, x, t, c, text_embeds=te, time_ids=ti))
    step = step.lower(params, a["x"], a["t"], a["context"], a["text_embeds"], a["time_ids"]).compile()
    compile_s = time.perf_counter() - t

    def run() -> np.ndarray:
        return np.asarray(step(params, a["x"], a["t"], a["context"], a["text_embeds"], a["time_ids"]))

    medians, outputs = median_times({"sdjax": run}, args.repeats)
    return {"median": medians["sdjax"], "compile": compile_s,
            "max_diff": float(np.abs(outputs["sdjax"] - np.load(args.reference)).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "sdjax_bench_sdxl")
    p.add_argument("--size", type=int, default=128, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps((torch_child if args.child == "torch" else jax_child)(args)))
        return

    from _models import build_pipeline, saved

    if not (args.folder / "model_index.json").exists():
        saved(build_pipeline("sdxl"), args.folder)
        print(f"wrote {args.folder}", flush=True)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [*sys.argv[1:], "--folder", str(args.folder), "--reference", str(Path(tmp) / "torch.npy")]
        for child in ("torch", "jax"):
            proc = subprocess.run([sys.executable, __file__, *common, "--child", child], env=env,
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{child} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[child] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{child}: {results[child]}", flush=True)
    j, tm = results["jax"]["median"], results["torch"]["median"]
    print(f"SDXL UNet step, batch {args.batch}, {args.size}x{args.size} latents, fp32: sdjax {j:.1f} s "
          f"(compile {results['jax']['compile']:.0f} s), pytorch {tm:.1f} s, ratio sdjax/pytorch = {j / tm:.2f} "
          f"(max |diff| {results['jax']['max_diff']:.1e})")


if __name__ == "__main__":
    main()
