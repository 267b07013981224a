"""The ``sdjax`` command: a thin layer over the Python API.

    sdjax generate --prompt "a red circle on a blue background" [--model PATH] [-n 4] [--out DIR] ...
    sdjax convert SRC OUT [--dtype bfloat16]     # any checkpoint -> sdjax checkpoint (orbax)
    sdjax export SRC OUT                         # any checkpoint -> diffusers folder

Bad input gives one message and exit status 2, before anything is written; images are written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

A1111_SAMPLER_SUFFIX = {"karras": " Karras", "exponential": " Exponential"}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images (text-to-image, image-to-image, inpainting)")
    gen.add_argument("--model", help="diffusers folder, single-file checkpoint or sdjax checkpoint "
                                     "(default: the small model embedded in sdjax)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--guidance-rescale", type=float, default=0.0)
    gen.add_argument("--sampler", default="euler")
    gen.add_argument("--schedule", choices=("default", "karras", "exponential"),
                     help="sigma schedule (default: the model's own)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("-n", "--count", type=int, default=1, help="number of images")
    gen.add_argument("--batch-size", type=int, help="images per device batch (default: all at once)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--clip-skip", type=int, help="diffusers' meaning: 1 = penultimate layer (A1111's 2)")
    gen.add_argument("--eta", type=float)
    gen.add_argument("--image", help="input image for image-to-image / inpainting")
    gen.add_argument("--strength", type=float, help="how much of the schedule to run on --image")
    gen.add_argument("--mask", help="inpainting mask (white = repaint), same size as --image")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    gen.add_argument("--out", default="outputs", help="output folder (created if missing)")
    gen.add_argument("--grid", action="store_true", help="also write grid.png with all images")
    gen.set_defaults(run=_generate)

    conv = commands.add_parser("convert", help="convert a checkpoint (diffusers folder, .safetensors, .ckpt) "
                                              "into an sdjax checkpoint (orbax params + configs + tokenizers)")
    conv.add_argument("src")
    conv.add_argument("out")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the params when writing")
    conv.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                      help="override the scheduler's (e.g. SD 2.x 768-v single files)")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(run=_convert)

    export = commands.add_parser("export", help="write any loadable model as a diffusers folder (safetensors)")
    export.add_argument("src")
    export.add_argument("out")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(run=_export)
    from sdjax import batch_cli

    batch_cli.add_commands(commands)
    return parser


def _check_out(out: str, force: bool) -> None:
    if Path(out).exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")


def _convert(args: argparse.Namespace) -> None:
    _check_out(args.out, args.force)
    import sdjax
    from sdjax.checkpoint import save_checkpoint

    pipe = sdjax.load(args.src, prediction_type=args.prediction_type)
    save_checkpoint(pipe, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote sdjax checkpoint {args.out}")


def _export(args: argparse.Namespace) -> None:
    _check_out(args.out, args.force)
    import sdjax
    from sdjax.checkpoint import export_diffusers

    export_diffusers(sdjax.load(args.src), args.out, force=args.force)
    print(f"wrote diffusers folder {args.out}")


def a1111_parameters(args: argparse.Namespace, seed: int, index: int, width: int, height: int,
                     model_name: str) -> str:
    """Generation settings in AUTOMATIC1111's ``parameters`` format, which image browsers read."""
    from sdjax.samplers.registry import SAMPLER_INFO

    sampler = SAMPLER_INFO[args.sampler]["a1111"] or args.sampler
    sampler += A1111_SAMPLER_SUFFIX.get(args.schedule or "", "")
    fields = [f"Steps: {args.steps}", f"Sampler: {sampler}", f"CFG scale: {args.guidance:g}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Model: {model_name}"]
    if args.clip_skip is not None:
        fields.append(f"Clip skip: {args.clip_skip + 1}")  # A1111 counts the last layer as 1
    if args.image:
        fields.append(f"Denoising strength: {_strength(args):g}")
    if args.guidance_rescale:
        fields.append(f"CFG rescale: {args.guidance_rescale:g}")
    if index:
        fields.append(f"Batch pos: {index}")  # image i of a seed uses fold_in(PRNGKey(seed), i)
    lines = [args.prompt]
    if args.negative_prompt:
        lines.append(f"Negative prompt: {args.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _strength(args: argparse.Namespace) -> float:
    if args.strength is not None:
        return args.strength
    return 1.0 if args.mask else 0.8


def _open_image(path: str, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{what} {path!r} is not a readable image ({e})") from None


def _check_args(args: argparse.Namespace) -> None:
    if args.count < 1:
        raise UsageError(f"-n must be at least 1, got {args.count}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.mask and not args.image:
        raise UsageError("--mask needs --image")
    if args.strength is not None and not args.image:
        raise UsageError("--strength needs --image")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{name} {value}: must be a positive multiple of 8")
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither")
    from sdjax.samplers.registry import get_sampler

    get_sampler(args.sampler)  # before the model loads: an unknown name is one ValueError listing the valid ones


class _CompileClock:
    """Seconds JAX spends tracing and compiling, from its monitoring events."""

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            self.seconds += duration


def _generate(args: argparse.Namespace) -> None:
    _check_args(args)
    image = _open_image(args.image, "--image") if args.image else None
    mask = _open_image(args.mask, "--mask") if args.mask else None
    if image is not None and mask is not None and image.size != mask.size:
        raise UsageError(f"--image is {image.size[0]}x{image.size[1]} but --mask is "
                         f"{mask.size[0]}x{mask.size[1]}; they must have the same size")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")

    import jax.numpy as jnp
    from tqdm import tqdm

    import sdjax
    from sdjax.images import save_png

    clock = _CompileClock()
    start = time.perf_counter()
    pipe = sdjax.load(args.model, dtype=getattr(jnp, args.dtype))
    load_seconds = time.perf_counter() - start
    model_name = Path(args.model).stem if args.model else "sdjax-default"

    options: dict[str, Any] = dict(
        negative_prompt=args.negative_prompt, num_steps=args.steps, guidance_scale=args.guidance,
        sampler=args.sampler, schedule=args.schedule, clip_skip=args.clip_skip,
        guidance_rescale=args.guidance_rescale, eta=args.eta, output="pil",
    )
    batch_size = args.batch_size or args.count
    bar = tqdm(total=args.steps * -(-args.count // batch_size), unit="step", disable=not sys.stderr.isatty(),
               desc="sampling")
    options["progress"] = lambda step, total: bar.update(1)
    written: list[Path] = []
    compile_before = clock.seconds
    start = time.perf_counter()
    for first in range(0, args.count, batch_size):
        n = min(batch_size, args.count - first)
        prompts = [args.prompt] * n
        # Images of one seed are numbered across batches, so batching never changes an image.
        if image is None:
            result = _call(pipe.text_to_image, prompts, seed=args.seed, height=args.height, width=args.width,
                           first=first, **options)
        elif mask is None:
            result = _call(pipe.image_to_image, prompts, image, seed=args.seed, strength=_strength(args),
                           first=first, **options)
        else:
            result = _call(pipe.inpaint, prompts, image, mask, seed=args.seed, strength=_strength(args),
                           first=first, **options)
        for i, picture in enumerate(result):
            index = first + i
            path = out_dir / f"{args.seed:06d}-{index:03d}.png"
            save_png(picture, path, a1111_parameters(args, args.seed, index, picture.width, picture.height,
                                                      model_name))
            written.append(path)
    bar.close()
    total = time.perf_counter() - start
    print(f"wrote {len(written)} image(s) to {out_dir}/")
    if args.grid:
        from PIL import Image

        pictures = [Image.open(p) for p in written]
        print(f"wrote {_write_grid(pictures, out_dir / 'grid.png')}")
    compile_seconds = clock.seconds - compile_before
    print(f"load {load_seconds:.1f} s, compile {compile_seconds:.1f} s, generation {total - compile_seconds:.1f} s "
          f"({args.count} image(s), {args.steps} steps)")


def _write_grid(pictures: list[Any], path: Path) -> Path:
    from PIL import Image

    from sdjax.images import save_png

    columns = min(len(pictures), 8)
    rows = -(-len(pictures) // columns)
    w, h = pictures[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, picture in enumerate(pictures):
        grid.paste(picture, ((i % columns) * w, (i // columns) * h))
    save_png(grid, path)
    return path


def _call(method: Any, *args: Any, first: int, **kwargs: Any) -> Any:
    return method(*args, image_index_offset=first, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    # transformers is only our tokenizer here; its notice that PyTorch is missing is noise on the command line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = _build_parser()
    args = parser.parse_args(argv)
    from sdjax.convert.safe_load import CheckpointError
    from sdjax.convert.weights import WeightMismatchError
    from sdjax.models.config import ConfigError

    try:
        args.run(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, ConfigError, CheckpointError,
            WeightMismatchError) as e:
        print(f"sdjax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
