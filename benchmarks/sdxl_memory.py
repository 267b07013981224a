"""Peak resident memory for loading and running SDXL (full-size config, random weights): bf16 vs fp32.

    python benchmarks/sdxl_memory.py --folder /tmp/sdxl [--size 1024] [--steps 2]

First run writes a random-weight SDXL diffusers folder (fp32, ~10 GB on disk; needs ~14 GB RAM once). Then
each dtype runs in its own process: ``sdjax.load(folder, dtype=...)``, one generation; it reports the peak
RSS after loading and after running (``ru_maxrss``, which also counts the pages of the memory-mapped weight
files: the kernel can drop those) and the peak anonymous RSS (sampled every 50 ms): what a host must have free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time
import jax.numpy as jnp
import sdjax

folder, dtype, size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
anon = [0.0]  # peak anonymous RSS, sampled: ru_maxrss also counts the weight files' mapped (evictable) pages


def sample():
    while True:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
        anon[0] = max(anon[0], kib / 2**20)
        time.sleep(0.05)


threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
pipe = sdjax.load(folder, dtype=getattr(jnp, dtype))
loaded, loaded_anon, load_s = peak(), anon[0], time.perf_counter() - t
t = time.perf_counter()
pipe.text_to_image(["a red cat"], num_steps=steps, height=size, width=size, guidance_scale=7.5)
print(json.dumps({"loaded": loaded, "loaded_anon": loaded_anon, "ran": peak(), "ran_anon": anon[0],
                  "load_s": load_s, "run_s": time.perf_counter() - t}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = p.parse_args()
    repo = Path(__file__).resolve().parent
    if not (args.folder / "model_index.json").exists():
        sys.path.insert(0, str(repo))
        from _models import build_pipeline, saved

        saved(build_pipeline("sdxl"), args.folder)
        print(f"wrote {args.folder}", flush=True)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo.parent), os.environ.get("PYTHONPATH")]))}
    for dtype in args.dtypes:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.folder), dtype, str(args.size), str(args.steps)],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"{dtype}: failed (exit {proc.returncode}; killed for memory?)\n{proc.stderr[-1500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"SDXL {dtype}: peak RSS {r['loaded']:.1f} GiB after loading ({r['load_s']:.0f} s; anonymous "
              f"{r['loaded_anon']:.1f} GiB), {r['ran']:.1f} GiB after {args.size}x{args.size} x {args.steps} steps "
              f"({r['run_s']:.0f} s; anonymous {r['ran_anon']:.1f} GiB)", flush=True)


if __name__ == "__main__":
    main()
