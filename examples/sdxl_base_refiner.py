"""SDXL base -> refiner ("ensemble of experts"): the base denoises the first 80 % of the schedule and hands its
latents to the refiner, which finishes the last 20 %.

    python examples/sdxl_base_refiner.py --base sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors
"""

from __future__ import annotations

import argparse

import sdjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--refiner", required=True)
    parser.add_argument("--prompt", default="a majestic lion jumping from a big stone at night")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--switch", type=float, default=0.8, help="fraction of the schedule the base runs")
    parser.add_argument("--out", default="sdxl.png")
    args = parser.parse_args()

    base, refiner = sdjax.load(args.base), sdjax.load(args.refiner)
    latents = base.text_to_image(args.prompt, num_steps=args.steps, denoising_end=args.switch, output="latent")
    image = refiner.image_to_image(args.prompt, latents, num_steps=args.steps, denoising_start=args.switch,
                                   output="pil")[0]
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
