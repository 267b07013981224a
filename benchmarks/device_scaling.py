"""Images/s against the device count: 1, 2 and 4 simulated CPU devices (or the real accelerators).

    python benchmarks/device_scaling.py [--model PATH] [--counts 1 2 4] [--batch 4] [--size 64] [--steps 20]

Each count runs in its own process (XLA's device count is fixed at start) with
``--xla_force_host_platform_device_count``; the batch is sharded over a ``data`` mesh of that many devices.
On one CPU host the simulated devices share the same cores, so this measures the SPMD overhead and how well
the partitioned program uses the cores, not a real multi-device speed-up. ``--real`` uses the real devices
(a GPU or TPU host) with meshes of the first N of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import jax
import sdjax
from sdjax import parallel

model = sys.argv[1] or None
n, batch, size, steps = (int(a) for a in sys.argv[2:6])
pipe = sdjax.load(model)
mesh = parallel.data_mesh(jax.devices()[:n])
options = dict(num_steps=steps, sampler="euler", guidance_scale=7.5, height=size, width=size, seed=0, mesh=mesh)
prompts = ["a red cat on a chair"] * batch
pipe.text_to_image(prompts, **options)
times = []
for _ in range(3):
    t = time.perf_counter()
    pipe.text_to_image(prompts, **options)
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": sorted(times)[1], "devices": n, "kind": jax.devices()[0].device_kind}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--real", action="store_true")
    args = p.parse_args()
    repo = Path(__file__).resolve().parents[1]
    base = None
    for n in args.counts:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        if not args.real:
            env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
            env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run([sys.executable, "-c", CHILD, args.model, str(n), str(args.batch), str(args.size),
                               str(args.steps)], env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rate = args.batch / r["seconds"]
        base = base or rate
        print(f"{n} device(s) ({r['kind']}): batch {args.batch} in {r['seconds']:.2f} s = {rate:.2f} images/s "
              f"({rate / base:.2f}x of {args.counts[0]})", flush=True)


if __name__ == "__main__":
    main()
