"""Text-to-image with any model sdjax loads, split over every device.

    python examples/text_to_image.py --model path/to/model --prompt "a castle at dawn" -n 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sdjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path (default: the embedded default model)")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--schedule", default="karras")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("outputs/text_to_image"))
    args = parser.parse_args()

    pipe = sdjax.load(args.model)
    images = pipe.text_to_image([args.prompt] * args.n, num_steps=args.steps, sampler=args.sampler,
                                schedule=args.schedule, seed=0, output="pil")
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(args.out / f"{i:03d}.png")
    print(f"wrote {len(images)} images to {args.out}")


if __name__ == "__main__":
    main()
