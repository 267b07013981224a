"""The README's "Any size" pictures, from the embedded default model (trained at 64x64):

- docs/hires_example.png: the 64x64 image enlarged (Lanczos), the same prompt drawn at 128x128 directly, and
  A1111's hires fix (64x64, latent upscale x2, image-to-image at 0.6);
- docs/tiling_example.png: a 128x128 image repeated 2x2, without and with seamless tiling.

    python examples/readme_any_size.py [--out docs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import sdjax

PROMPT = "a yellow triangle on a green background"
COMMON = dict(num_steps=20, sampler="euler", guidance_scale=5.0, seed=1)
GAP = 8


def row(images: list[Image.Image]) -> Image.Image:
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + GAP
    return out


def hires_example(pipe: sdjax.Pipeline) -> Image.Image:
    base = pipe.text_to_image(PROMPT, height=64, width=64, output="pil", **COMMON)[0]
    direct = pipe.text_to_image(PROMPT, height=128, width=128, output="pil", **COMMON)[0]
    fixed = pipe.text_to_image(PROMPT, height=64, width=64, hires_scale=2.0, hires_strength=0.6,
                               hires_upscaler="Latent", output="pil", **COMMON)[0]
    return row([base.resize((128, 128), Image.Resampling.LANCZOS), direct, fixed])


def tiling_example(pipe: sdjax.Pipeline) -> Image.Image:
    def repeated(p: sdjax.Pipeline) -> Image.Image:
        image = np.asarray(p.text_to_image("a yellow circle on a blue background", height=128, width=128,
                                           output="pil", **COMMON)[0])
        return Image.fromarray(np.tile(image, (2, 2, 1)))

    return row([repeated(pipe), repeated(pipe.with_tiling())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs", help="folder for the PNGs")
    args = parser.parse_args()
    pipe = sdjax.load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("hires_example.png", hires_example), ("tiling_example.png", tiling_example)):
        make(pipe).save(out / name, optimize=True)
        print(out / name)


if __name__ == "__main__":
    main()
