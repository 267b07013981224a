"""Merge LoRAs and add a textual-inversion embedding, then compare with the plain model.

    python examples/lora_and_embeddings.py --model v1-5.safetensors --lora style.safetensors:0.8 \
        --embedding EasyNegative.safetensors --prompt "a portrait" --negative-prompt "EasyNegative"
"""

from __future__ import annotations

import argparse

from sdjax import load
from sdjax.convert.lora import apply_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", action="append", default=[], help="PATH[:WEIGHT], repeatable")
    parser.add_argument("--embedding", action="append", default=[], help="textual-inversion file, repeatable")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    plain = load(args.model)
    loras = []
    for spec in args.lora:
        path, _, weight = spec.partition(":")
        loras.append((path, float(weight or 1.0)))
    pipe = apply_lora(plain, loras) if loras else plain  # `plain` keeps its own params
    for embedding in args.embedding:
        pipe = pipe.with_embeddings(embedding)
    for name, model in (("plain", plain), ("styled", pipe)):
        options = dict(negative_prompt=args.negative_prompt, seed=args.seed, output="pil")
        if name == "plain":
            options["negative_prompt"] = None  # the plain model does not know the embedding's token
        model.text_to_image(args.prompt, **options)[0].save(f"{name}.png")
        print(f"wrote {name}.png")


if __name__ == "__main__":
    main()
