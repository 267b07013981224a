"""Time to first image: a cold process (empty cache), a second process with the cache, and a warm call.

    python benchmarks/warm_start.py [--model PATH] [--size 64] [--steps 20] [--sampler euler] [--runs 2]

Each process is a fresh Python started by this script with one temporary cache folder shared by all of them
(``sdjax.compile_cache.enable``). Per process it prints: load time, the compile phase as the CLI counts it
(JAX's trace, lower and backend-compile events after loading, plus the time to read and load serialized
executables), the first call's wall time (compile + generate + decode) and a second, warm call's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax
import sdjax
from sdjax import compile_cache

model, cache, size, steps, sampler = sys.argv[1] or None, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
compile_seconds = [0.0]
EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration", compile_cache.LOAD_EVENT)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: compile_seconds.__setitem__(0, compile_seconds[0] + duration * (event in EVENTS)))
compile_cache.enable(cache)
pipe = sdjax.load(model)
load = time.perf_counter() - t0
compile_seconds[0] = 0.0
options = dict(num_steps=steps, sampler=sampler, guidance_scale=7.5, height=size, width=size, seed=1)
t = time.perf_counter()
first = pipe.text_to_image(["a red cat on a chair"], **options)
first_s = time.perf_counter() - t
compile_s = compile_seconds[0]
t = time.perf_counter()
pipe.text_to_image(["a red cat on a chair"], **options)
warm_s = time.perf_counter() - t
print(json.dumps({"load": load, "compile": compile_s, "first": first_s, "warm": warm_s,
                  "from_start": load + first_s, "checksum": float(first.sum())}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="default: the built-in model")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--runs", type=int, default=2, help="processes (the first is cold)")
    args = p.parse_args()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("SDJAX_NO_CACHE", None)
    print(f"model {args.model or 'default'}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, CFG 7.5")
    with tempfile.TemporaryDirectory() as cache:
        results = []
        for run in range(args.runs):
            proc = subprocess.run([sys.executable, "-c", CHILD, args.model, cache, str(args.size), str(args.steps),
                                   args.sampler], env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            label = "cold process   " if run == 0 else "cached process "
            print(f"{label} load {r['load']:.1f} s, compile phase {r['compile']:.2f} s, first call {r['first']:.2f} s"
                  f" (first image {r['from_start']:.1f} s after start), warm call {r['warm']:.2f} s", flush=True)
        for r in results[1:]:
            print(f"second process compile phase / cold = {r['compile'] / results[0]['compile']:.1%}; "
                  f"images identical: {r['checksum'] == results[0]['checksum']}")


if __name__ == "__main__":
    main()
