"""A labelled grid of a guidance sweep: CFG scales (columns) x guidance intervals (rows), every cell from the
same noise, each row one compiled call.

    python examples/guidance_grid.py --out docs/guidance_grid.png [--model PATH] [--prompt TEXT]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

import sdjax
from sdjax import guidance as g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model path (default: the embedded default model)")
    parser.add_argument("--prompt", default="a yellow triangle on a black background")
    parser.add_argument("--scales", default="1.5,3,5,8")
    parser.add_argument("--intervals", default="0:inf,0.3:5,1:inf", help="SIGMA_MIN:SIGMA_MAX per row")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="guidance_grid.png")
    args = parser.parse_args()

    pipe = sdjax.load(args.model)
    scales = np.asarray([float(s) for s in args.scales.split(",")], np.float32)
    rows = []
    for spec in args.intervals.split(","):
        low, high = (float(v) for v in spec.split(":"))
        method = g.Interval(g.CFG(scales), sigma_min=low, sigma_max=high)  # a sweep over the scales
        images = pipe.text_to_image(args.prompt, guidance=method, num_steps=args.steps, sampler="dpmpp_2m",
                                    seed=args.seed, output="pil")  # K lists of one image each
        rows.append((f"sigma in ({low:g}, {high:g}]", [cell[0] for cell in images]))

    size = rows[0][1][0].width
    label_w, label_h = 130, 18
    grid = Image.new("RGB", (label_w + size * len(scales), label_h + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for k, scale in enumerate(scales):
        draw.text((label_w + k * size + 4, 3), f"CFG {scale:g}", fill="black")
    for r, (label, images) in enumerate(rows):
        draw.text((4, label_h + r * size + size // 2 - 6), label, fill="black")
        for k, image in enumerate(images):
            grid.paste(image, (label_w + k * size, label_h + r * size))
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
