"""A guidance sweep (issue 8): K guidance scales in one call vs K single calls, tiny SD1 model, 32x32, CPU.

    python benchmarks/guidance_sweep.py [--k 4] [--steps 20] [--repeats 5] [--folder DIR]

Both are compiled first (warm-up), then timed round-robin; prints the median of each and the ratio
sweep / sum of singles (target <= 1.15). The sweep runs the K settings as a vmapped batch over one loop, so
the ratio says how much of the per-call cost (dispatch, text encoding, decode) K calls pay K times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_folder(folder: Path) -> Path:
    if not (folder / "model_index.json").exists():
        import json

        sys.path.insert(0, str(REPO))
        from tests.conftest import deterministic_vae
        from tests.reference.tiny_pipelines import build

        pipe = build("sd1")
        deterministic_vae(pipe)
        pipe.save_pretrained(folder, safe_serialization=True)
        config = folder / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "clip_sample": False}))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "sdjax_bench_tiny_sd1")
    args = p.parse_args()
    import numpy as np

    import sdjax

    pipe = sdjax.load(tiny_folder(args.folder))
    scales = [float(s) for s in np.linspace(2.0, 9.0, args.k)]
    options = dict(num_steps=args.steps, sampler="euler", height=32, width=32, seed=3)
    prompt = ["a red cat on a chair"]

    def sweep():
        return pipe.text_to_image(prompt, guidance_scale=scales, **options)

    def singles():
        return [pipe.text_to_image(prompt, guidance_scale=s, **options) for s in scales]

    swept, single = sweep(), singles()  # compile both
    err = max(float(np.abs(swept[k] - single[k]).max()) for k in range(args.k))
    ts, tk = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        sweep()
        ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        singles()
        tk.append(time.perf_counter() - t)
    a, b = statistics.median(ts), statistics.median(tk)
    print(f"tiny SD1, 32x32, {args.steps} steps, K={args.k} scales {scales}")
    print(f"sweep {a * 1e3:.1f} ms, {args.k} single calls {b * 1e3:.1f} ms (medians of {args.repeats}); "
          f"ratio sweep / sum of singles = {a / b:.2f} (target <= 1.15); max |sweep - single| = {err:.1e}")


if __name__ == "__main__":
    main()
