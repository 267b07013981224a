"""The ``sdjax`` command: a thin layer over the Python API.

    sdjax generate --prompt "a red circle on a blue background" [--model PATH] [-n 4] [--out DIR] ...
    sdjax convert SRC OUT [--dtype bfloat16]     # any checkpoint -> sdjax checkpoint (orbax)
    sdjax export SRC OUT                         # any checkpoint -> diffusers folder

Bad input gives one message naming the option and exit status 2, before anything is loaded, compiled or
written. Images are numbered as A1111 numbers them (``00012-1234567.png``), written atomically, and never
replace a file. Ctrl-C exits with status 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEED_LIMIT = 2**32
DTYPES = ("float32", "bfloat16", "float16")
EMPHASIS_NAMES = {"original": "Original", "no_norm": "No norm", "none": "None"}  # A1111's names of the modes
DEFAULT_MODEL_NAME = "sdjax-default"


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _note(message: str) -> None:
    print(f"sdjax: {message}", file=sys.stderr, flush=True)


# --- the parser --------------------------------------------------------------------------------------------

class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options with a value; options whose default is None say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _ListSamplers(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from sdjax.samplers.names import A1111_NAMES
        from sdjax.samplers.registry import SAMPLERS

        print(f"{'sdjax name':<14} {'sigma schedules':<30} A1111 names")
        for name, sampler in SAMPLERS.items():
            aliases = [a for a, (s, _) in A1111_NAMES.items() if s == name]
            print(f"{name:<14} {', '.join(sampler.sigma_schedules):<30} {', '.join(aliases) or '-'}")
        parser.exit()


def _version() -> str:
    from sdjax import __version__

    return __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"sdjax {_version()}",
                        help="print the version and exit")
    parser.add_argument("--list-samplers", action=_ListSamplers,
                        help="list the samplers, their sigma schedules and A1111 names, and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images (text-to-image, image-to-image, inpainting)",
                              formatter_class=_Formatter)
    gen.add_argument("--list-samplers", action=_ListSamplers,
                     help="list the samplers, their sigma schedules and A1111 names, and exit")
    model = gen.add_argument_group("model")
    model.add_argument("--model", help="diffusers folder, single-file checkpoint or sdjax checkpoint "
                                       "(default: the small model embedded in sdjax)")
    model.add_argument("--vae", help="a separate VAE (diffusers folder or file) replacing the model's "
                                     "(default: the model's own)")
    model.add_argument("--config", help="for single files: a diffusers-layout folder whose configs replace the "
                                        "detected family's (default: the shipped configs)")
    model.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                       help="override the scheduler's (default: the model's own)")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                       help="merge a LoRA (kohya/A1111 or diffusers/PEFT) with weight WEIGHT (1.0 if left "
                            "out); repeatable (default: none)")
    model.add_argument("--embedding", action="append", default=[], metavar="PATH",
                       help="add a textual-inversion embedding, used in prompts by its file name; repeatable "
                            "(default: none)")
    model.add_argument("--lora-dir", action="append", default=[], metavar="FOLDER",
                       help="where <lora:NAME:WEIGHT> tags in --prompt find NAME.safetensors/.pt/.ckpt (A1111's "
                            "extra networks; subfolders too); repeatable (default: none)")
    model.add_argument("--hypernetwork-dir", action="append", default=[], metavar="FOLDER",
                       help="where <hypernet:NAME:STRENGTH> tags in --prompt find NAME.pt; repeatable "
                            "(default: none)")
    model.add_argument("--dtype", choices=DTYPES, default="float32", help="params and compute dtype")
    model.add_argument("--devices", type=int, help="run on the first N devices (default: all of them)")

    prompt = gen.add_argument_group("prompt")
    prompt.add_argument("--prompt", help="what to draw (required unless --from-image gives it)")
    prompt.add_argument("--negative-prompt", help="what to steer away from (default: none)")
    prompt.add_argument("--prompt-2", help="SDXL: prompt for the second text encoder (default: --prompt)")
    prompt.add_argument("--negative-prompt-2", help="SDXL: negative prompt for the second text encoder "
                                                    "(default: --negative-prompt)")
    prompt.add_argument("--clip-skip", type=int,
                        help="diffusers' meaning: 1 = penultimate layer (A1111's 2) (default: last layer)")
    prompt.add_argument("--emphasis", choices=EMPHASIS_NAMES, default="original",
                        help="how (word:1.2) weights apply, as A1111's setting: original (multiply, then restore "
                             "the mean), no_norm (only multiply), none (brackets are text)")
    prompt.add_argument("--from-image", metavar="IMAGE",
                        help="take the settings from an image's A1111 metadata (PNG/JPEG/WebP); options given "
                             "on the command line win (default: none)")

    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=30, help="sampling steps")
    sampling.add_argument("--sampler", default="euler",
                          help="an sdjax name (euler, dpmpp_2m, ...) or an A1111 name ('Euler a', "
                               "'DPM++ 2M Karras'), any case; see --list-samplers")
    sampling.add_argument("--schedule", choices=("default", "karras", "exponential"),
                          help="sigma schedule (default: the model's own, or the one an A1111 name implies)")
    sampling.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument("--guidance-rescale", type=float, default=0.0,
                          help="rescale guided noise towards the conditional one's std, 0..1")
    sampling.add_argument("--eta", type=float,
                          help="noise of DDIM / ancestral / SDE samplers, >= 0 (default: the sampler's own: "
                               "DDIM 0, ancestral and SDE 1)")
    sampling.add_argument("--seed", type=int, default=-1,
                          help="seed of the first image; image i gets seed + i; -1 picks a random seed")

    from sdjax import control_cli
    from sdjax.guidance import cli_options

    cli_options.add_arguments(gen)
    control_cli.add_arguments(gen)

    size = gen.add_argument_group("size and count")
    size.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's size, "
                                                 "or --image's)")
    size.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's size, "
                                                "or --image's)")
    size.add_argument("-n", "--count", type=int, default=1, help="number of images")
    size.add_argument("--batch-size", type=int, help="images per batch (default: all at once)")
    size.add_argument("--tiling", action="store_true",
                      help="seamless tiling, A1111's Tiling: the UNet and VAE pad circularly, so the image "
                           "repeats without seams (textures) (default: off)")

    hires = gen.add_argument_group("hires fix (A1111's: generate, upscale, image-to-image at the new size)")
    hires.add_argument("--hires-scale", type=float, metavar="SCALE",
                       help="turn on the hires fix: upscale the image by SCALE (>= 1) and re-draw it "
                            "(default: off)")
    hires.add_argument("--hires-strength", type=float,
                       help="denoising strength of the hires pass, in (0, 1] (default: 0.7, A1111's)")
    hires.add_argument("--hires-steps", type=int,
                       help="steps the hires pass runs; 0 = --steps (default: 0, as A1111)")
    hires.add_argument("--hires-upscaler", metavar="NAME",
                       help="A1111's upscaler names, any case: 'Latent' (bilinear), 'Latent (antialiased)', "
                            "'Latent (bicubic)', 'Latent (bicubic antialiased)', 'Latent (nearest)', "
                            "'Latent (nearest-exact)', or in pixels 'Lanczos', 'Nearest' (default: Latent)")

    img = gen.add_argument_group("image-to-image and inpainting")
    img.add_argument("--image", help="input image for image-to-image / inpainting (default: none)")
    img.add_argument("--strength", type=float,
                     help="how much of the schedule to run on --image, in (0, 1] (default: 0.8, or 1.0 with "
                          "--mask)")
    img.add_argument("--mask", help="inpainting mask (white = repaint), same size as --image (default: none)")
    img.add_argument("--resize-mode", choices=("just-resize", "crop", "fill"), default="just-resize",
                     help="how --image is fitted to --width/--height (A1111's resize modes)")

    refine = gen.add_argument_group("SDXL refiner")
    refine.add_argument("--refiner", metavar="MODEL", help="SDXL refiner: the base runs the first part of the "
                                                          "schedule, the refiner the rest (default: none)")
    refine.add_argument("--refiner-switch", type=float, default=0.8,
                        help="fraction of the schedule after which the refiner takes over, in (0, 1)")

    output = gen.add_argument_group("output")
    output.add_argument("--out", default="outputs", help="output folder (created if missing)")
    output.add_argument("--format", choices=("png", "jpg", "webp"), default="png",
                        help="image format; JPEG/WebP carry the settings in EXIF UserComment as A1111 writes")
    output.add_argument("--grid", action="store_true", help="also write a grid of all images (default: off)")
    output.add_argument("--save-latents", action="store_true",
                        help="also write each image's final latents as .npy beside it, shape (1, C, H/8, W/8) "
                             "(default: off)")
    gen.set_defaults(run=_generate)
    parser.generate_parser = gen  # type: ignore[attr-defined]  # --from-image sets its defaults

    conv = commands.add_parser("convert", help="convert a checkpoint (diffusers folder, .safetensors, .ckpt) "
                                              "into an sdjax checkpoint (orbax params + configs + tokenizers)",
                               formatter_class=_Formatter)
    conv.add_argument("src", help="the checkpoint to convert")
    conv.add_argument("out", help="the sdjax checkpoint folder to write")
    conv.add_argument("--dtype", choices=DTYPES, help="cast the params when writing (default: as loaded)")
    conv.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                      help="override the scheduler's, e.g. SD 2.x 768-v single files (default: detected)")
    conv.add_argument("--config", metavar="FOLDER",
                      help="a diffusers-layout folder whose component configs replace the ones read from the "
                           "weights / the model's own (unet/config.json, scheduler/scheduler_config.json ...) "
                           "(default: none)")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    conv.set_defaults(run=_convert)

    merge = commands.add_parser("merge", formatter_class=_Formatter,
                                help="merge two checkpoints of one architecture (A1111's merger): "
                                     "(1 - alpha) * A + alpha * B, or A + (B - C) * alpha with --subtract")
    merge.add_argument("a", metavar="A", help="the first checkpoint (any format)")
    merge.add_argument("b", metavar="B", help="the second checkpoint, of A's architecture")
    merge.add_argument("out", metavar="OUT", help="where to write the merged model")
    merge.add_argument("--alpha", type=float, required=True, help="B's weight (0.3: 70%% A, 30%% B)")
    merge.add_argument("--subtract", metavar="C", help="add difference: A + (B - C) * alpha (default: weighted sum)")
    merge.add_argument("--format", choices=("sdjax", "safetensors"), default="sdjax",
                       help="an sdjax checkpoint folder (default) or one .safetensors file in the original layout")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="cast the params when writing (default: keep)")
    merge.add_argument("--config", metavar="FOLDER",
                       help="configs for single-file inputs (as convert's --config) (default: none)")
    merge.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    merge.set_defaults(run=_merge)

    export = commands.add_parser("export", help="write any loadable model as a diffusers folder (safetensors)",
                                 formatter_class=_Formatter)
    export.add_argument("src", help="the model to export")
    export.add_argument("out", help="the diffusers folder to write")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    export.set_defaults(run=_export)
    from sdjax import batch_cli

    batch_cli.add_commands(commands, names=Names, parameters=a1111_parameters)
    from sdjax import warmup_cli

    warmup_cli.add_commands(commands)
    warmup_cli.add_cache_flags(gen)
    for sub in commands.choices.values():  # every option's help names its default
        for action in sub._actions:
            if action.option_strings and action.required and "required" not in (action.help or ""):
                action.help = f"{action.help or ''} (required)"
            elif action.option_strings and action.help != argparse.SUPPRESS and "default" not in (action.help or ""):
                off = action.default in (None, False, [])
                action.help = (action.help or action.dest.replace("_", " ")) + (
                    " (default: off)" if off else f" (default: {action.default})")
            elif not action.option_strings and action.help is None and action.dest != "help":
                action.help = action.dest
    return parser


# --- convert / export --------------------------------------------------------------------------------------

def _check_out(out: str, force: bool) -> None:
    if Path(out).exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    _check_writable_folder(Path(out).parent if str(Path(out).parent) else Path("."), "OUT")


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Remove what a killed write into ``out`` left beside it: the ``.OUT.*.partial`` folders of
    checkpoint.atomic_folder and its ``.OUT.old``. Returns what was removed."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    stale = [p for p in out.parent.glob(f".{out.name}.*.partial") if p.is_dir()]
    stale += [p for p in [out.with_name(f".{out.name}.old")] if p.is_dir()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _convert(args: argparse.Namespace) -> None:
    _check_out(args.out, args.force)
    if not Path(args.src).exists():
        raise UsageError(f"SRC: no model at {args.src}")
    for folder in remove_stale_partials(args.out):
        _note(f"removed {folder.name}, left by an interrupted write")
    _WRITING_TO.append(Path(args.out))
    _note(f"loading {args.src}")
    import sdjax
    from sdjax.checkpoint import save_checkpoint

    pipe = sdjax.load(args.src, prediction_type=args.prediction_type, config=args.config)
    _note(f"writing {args.out}")
    save_checkpoint(pipe, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote sdjax checkpoint {args.out}")


def _merge(args: argparse.Namespace) -> None:
    _check_out(args.out, args.force)
    for path in (args.a, args.b, args.subtract):
        if path is not None and not Path(path).exists():
            raise UsageError(f"no model at {path}")
    from sdjax.loaders.merge import merge, write_merged

    merged = merge(args.a, args.b, alpha=args.alpha, subtract=args.subtract, config=args.config)
    write_merged(merged, args.out, format=args.format, dtype=args.dtype, force=args.force)
    print(f"wrote merged {'sdjax checkpoint' if args.format == 'sdjax' else 'single file'} {args.out}")


def _export(args: argparse.Namespace) -> None:
    _check_out(args.out, args.force)
    for folder in remove_stale_partials(args.out):
        _note(f"removed {folder.name}, left by an interrupted write")
    _WRITING_TO.append(Path(args.out))
    _note(f"loading {args.src}")
    import sdjax
    from sdjax.checkpoint import export_diffusers

    pipe = sdjax.load(args.src)
    _note(f"writing {args.out}")
    export_diffusers(pipe, args.out, force=args.force)
    print(f"wrote diffusers folder {args.out}")


# --- metadata ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Names:
    """What the metadata says about the weights: names and A1111 short hashes."""

    model: str = DEFAULT_MODEL_NAME
    model_hash: str | None = None
    vae: str | None = None
    vae_hash: str | None = None
    refiner: str | None = None
    refiner_hash: str | None = None
    loras: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)  # name, weight, hash
    embeddings: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # name, hash
    tag_loras: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # <lora:...> tags: name, hash


def a1111_parameters(args: argparse.Namespace, seed: int, width: int, height: int, names: Names,
                     extra: dict[str, Any] | None = None) -> str:
    """The settings of one image in AUTOMATIC1111's ``parameters`` format, which image browsers read. Every
    setting that changes the image is there; ``extra``: more fields appended as given (None values dropped)."""
    from sdjax.parameters import format_parameters
    from sdjax.samplers.names import a1111_name
    from sdjax.samplers.registry import get_sampler

    spec = get_sampler(args.sampler)
    # The schedule the image used: the one asked for, else the model's own (so "Euler" never means Karras).
    schedule = args.schedule or getattr(args, "model_schedule", None)
    if schedule not in spec.sigma_schedules:
        schedule = None
    fields: dict[str, Any] = {
        "Steps": args.steps, "Sampler": a1111_name(args.sampler, schedule), "CFG scale": f"{args.guidance:g}",
        "Seed": seed, "Size": f"{width}x{height}", "Model hash": names.model_hash, "Model": names.model,
        "VAE hash": names.vae_hash, "VAE": names.vae,
        "Denoising strength": f"{_strength(args):g}" if args.image else _hires_strength(args),
        "Clip skip": args.clip_skip + 1 if args.clip_skip is not None else None,  # A1111 counts the last as 1
        "Emphasis": _emphasis_field(getattr(args, "emphasis", "original")),
        "Tiling": "True" if getattr(args, "tiling", False) else None,
        "CFG rescale": f"{args.guidance_rescale:g}" if args.guidance_rescale else None,
        "Eta": f"{(args.eta if args.eta is not None else spec.default_eta):g}" if spec.uses_eta else None,
        "Prompt 2": args.prompt_2, "Negative prompt 2": args.negative_prompt_2,
        "Refiner": f"{names.refiner} [{names.refiner_hash}]" if names.refiner else None,
        "Refiner switch at": f"{args.refiner_switch:g}" if names.refiner else None,
        "Lora hashes": ", ".join([*(f"{n}: {h}" for n, _, h in names.loras),
                                  *(f"{n}: {h}" for n, h in names.tag_loras)]) or None,
        "Lora weights": ", ".join(f"{n}: {w:g}" for n, w, _ in names.loras) or None,
        "TI hashes": ", ".join(f"{n}: {h}" for n, h in names.embeddings) or None,
        "Dtype": args.dtype if args.dtype != "float32" else None,
        **_hires_fields(args),
        "Version": f"sdjax {_version()}",
    }
    return format_parameters(args.prompt, args.negative_prompt, fields, extra)


def _emphasis_field(mode: str) -> str | None:
    """A1111 writes its emphasis setting ("Emphasis: No norm") only when it is not the default, Original."""
    return None if mode == "original" else EMPHASIS_NAMES.get(mode, mode)


def _hires_strength(args: argparse.Namespace) -> str | None:
    from sdjax.hires import DEFAULT_STRENGTH

    if getattr(args, "hires_scale", None) is None:
        return None
    return f"{args.hires_strength if args.hires_strength is not None else DEFAULT_STRENGTH:g}"


def _hires_fields(args: argparse.Namespace) -> dict[str, Any]:
    """A1111's hires keys (its Size stays the first pass's; "Hires steps" only when not the base steps)."""
    from sdjax.hires import DEFAULT_UPSCALER, resolve_upscaler

    if getattr(args, "hires_scale", None) is None:
        return {}
    return {"Hires upscale": f"{args.hires_scale:g}", "Hires steps": args.hires_steps or None,
            "Hires upscaler": resolve_upscaler(args.hires_upscaler or DEFAULT_UPSCALER)}


_SCHEDULE_TYPES = {"karras": "karras", "exponential": "exponential", "automatic": None, "uniform": "default"}


def defaults_from_image(path: str) -> dict[str, Any]:
    """Generate options from an image's A1111 metadata (``--from-image``): parser defaults, which options
    given on the command line override."""
    from PIL import UnidentifiedImageError

    from sdjax.images import read_parameters
    from sdjax.parameters import parse_parameters
    from sdjax.samplers.names import resolve_sampler
    from sdjax.samplers.registry import get_sampler

    try:
        text = read_parameters(path)
    except FileNotFoundError:
        raise UsageError(f"--from-image {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--from-image {path!r} is not a readable image ({e})") from None
    if not text:
        raise UsageError(f"--from-image {path!r} has no A1111 parameters")
    p = parse_parameters(text)
    out: dict[str, Any] = {"prompt": p["Prompt"], "negative_prompt": p["Negative prompt"] or None,
                           "from_image_fields": p}
    try:
        if "Steps" in p:
            out["steps"] = int(p["Steps"])
        if "CFG scale" in p:
            out["guidance"] = float(p["CFG scale"])
        if "Seed" in p:
            out["seed"] = int(p["Seed"])
        if "Size" in p:
            width, _, height = p["Size"].partition("x")
            out["width"], out["height"] = int(width), int(height)
        if "Sampler" in p:
            sampler, schedule = resolve_sampler(p["Sampler"])
            if "Schedule type" in p:
                schedule = _SCHEDULE_TYPES.get(p["Schedule type"].lower(), schedule)
            elif schedule is None and "karras" in get_sampler(sampler).sigma_schedules:
                schedule = "default"  # an A1111 name without a suffix is the plain schedule
            out["sampler"], out["schedule"] = sampler, schedule
        if "Hires upscale" in p:  # a hires-fix image: its Denoising strength is the hires pass's
            out["hires_scale"] = float(p["Hires upscale"])
            if "Denoising strength" in p:
                out["hires_strength"] = float(p["Denoising strength"])
            if "Hires steps" in p:
                out["hires_steps"] = int(p["Hires steps"])
            if "Hires upscaler" in p:
                out["hires_upscaler"] = p["Hires upscaler"]
        elif "Denoising strength" in p:
            out["strength"] = float(p["Denoising strength"])
        if "Clip skip" in p and int(p["Clip skip"]) > 1:
            out["clip_skip"] = int(p["Clip skip"]) - 1
        if "CFG rescale" in p:
            out["guidance_rescale"] = float(p["CFG rescale"])
        if "Emphasis" in p:
            modes = {name.lower(): mode for mode, name in EMPHASIS_NAMES.items()}
            if p["Emphasis"].lower() not in modes:
                raise ValueError(f"Emphasis {p['Emphasis']!r}")
            out["emphasis"] = modes[p["Emphasis"].lower()]
        if p.get("Tiling", "").lower() == "true":
            out["tiling"] = True
        if "Eta" in p:
            out["eta"] = float(p["Eta"])
        for key, dest in (("Prompt 2", "prompt_2"), ("Negative prompt 2", "negative_prompt_2")):
            if key in p:
                out[dest] = p[key]
        if "Refiner switch at" in p:
            out["refiner_switch"] = float(p["Refiner switch at"])
        if p.get("Dtype") in DTYPES:
            out["dtype"] = p["Dtype"]
    except ValueError as e:
        raise UsageError(f"--from-image {path!r}: unreadable settings ({e})") from None
    return out


def _warn_about_source(args: argparse.Namespace, names: Names) -> None:
    """With --from-image: say where the weights differ from the ones the image was made with."""
    fields = getattr(args, "from_image_fields", None)
    if not fields:
        return
    if fields.get("Model hash") and names.model_hash and fields["Model hash"] != names.model_hash:
        _note(f"warning: --from-image was made with model {fields.get('Model', '?')} [{fields['Model hash']}], "
              f"this is {names.model} [{names.model_hash}]")
    given_hashes = {"Lora hashes": {h for _, _, h in names.loras} | {h for _, h in names.tag_loras},
                    "TI hashes": {h for _, h in names.embeddings}}
    for key, given in given_hashes.items():
        recorded = {item.rpartition(":")[2].strip() for item in fields.get(key, "").split(",") if item.strip()}
        if recorded - given:
            _note(f"warning: --from-image used {key.split()[0]} {fields[key]}; pass the same files "
                  f"(--lora / --embedding) to reproduce it")
    if fields.get("Refiner") and not args.refiner:
        _note(f"warning: --from-image used refiner {fields['Refiner']}; pass --refiner to reproduce it")


# --- checks before any work ------------------------------------------------------------------------------

def _strength(args: argparse.Namespace) -> float:
    if args.strength is not None:
        return args.strength
    return 1.0 if args.mask else 0.8


def _parse_lora(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def _check_exists(path: str | None, option: str) -> None:
    if path is not None and not Path(path).exists():
        raise UsageError(f"{option} {path!r} does not exist")


def _check_writable_folder(folder: Path, option: str) -> None:
    """``folder`` can be created or written: its nearest existing ancestor is a writable folder."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise UsageError(f"{option} {folder}: {probe} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{option} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder}: {probe} is not writable")


NETWORK_OPTIONS = {"lora": "--lora-dir", "hypernet": "--hypernetwork-dir"}


def _check_prompt_networks(args: argparse.Namespace) -> None:
    """A1111's <lora:...> / <hypernet:...> tags in --prompt: every file found before anything is loaded."""
    from sdjax import extra_networks

    try:
        extra_networks.parse(args.prompt or "", lora_dir=args.lora_dir, hypernetwork_dir=args.hypernetwork_dir,
                             options=NETWORK_OPTIONS)
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None


def _hires_flags(error: Exception) -> UsageError:
    """The hires module's error, its keywords (``hires_strength``) named as the flags (``--hires-strength``)."""
    return UsageError(re.sub(r"\bhires_(scale|strength|steps|upscaler)\b", r"--hires-\1", str(error)))


def _check_hires(args: argparse.Namespace) -> None:
    from sdjax.hires import OPTIONS, HiresOptions

    if args.hires_scale is None:
        for option in OPTIONS[1:]:
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} needs --hires-scale")
        return
    try:
        HiresOptions.build(*(getattr(args, option) for option in OPTIONS))
    except ValueError as e:
        raise _hires_flags(e) from None
    if args.image:
        raise UsageError("--hires-scale works with text-to-image only (no --image)")
    if args.refiner:
        raise UsageError("--hires-scale does not combine with --refiner")


def _check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: values, files and folders."""
    from sdjax.images import MAX_SIZE
    from sdjax.samplers.names import resolve_sampler
    from sdjax.samplers.registry import get_sampler

    if not args.prompt and args.prompt != "":
        raise UsageError("--prompt is required (or --from-image with A1111 metadata)")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.count < 1:
        raise UsageError(f"-n must be at least 1, got {args.count}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed == -1:
        args.seed = secrets.randbelow(SEED_LIMIT - args.count + 1)
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be -1 (random) or in [0, 2**32), got {args.seed}")
    if args.seed + args.count > SEED_LIMIT:
        raise UsageError(f"--seed {args.seed} with -n {args.count}: image seeds (seed + i) pass 2**32 - 1")
    if args.eta is not None and args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta:g}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale:g}")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength:g}")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise UsageError(f"--clip-skip must be >= 0, got {args.clip_skip}")
    _check_hires(args)
    _check_prompt_networks(args)
    if args.mask and not args.image:
        raise UsageError("--mask needs --image")
    if args.strength is not None and not args.image:
        raise UsageError("--strength needs --image")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{name} {value}: must be a positive multiple of 8")
        if value is not None and value > MAX_SIZE[args.format]:
            raise UsageError(f"--{name} {value}: --format {args.format} stores at most {MAX_SIZE[args.format]}")
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither")
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    try:
        sampler, implied = resolve_sampler(args.sampler)
    except ValueError as e:
        raise UsageError(f"--sampler: {e}") from None
    if implied is not None and args.schedule not in (None, implied):
        raise UsageError(f"--sampler {args.sampler!r} means the {implied} schedule but --schedule says "
                         f"{args.schedule}")
    args.sampler, args.schedule = sampler, args.schedule or implied
    schedules = get_sampler(sampler).sigma_schedules
    if args.schedule not in (None, *schedules):
        raise UsageError(f"--schedule {args.schedule}: sampler {sampler} has only {', '.join(schedules)}")
    if args.refiner is not None:
        if not 0.0 < args.refiner_switch < 1.0:
            raise UsageError(f"--refiner-switch must be in (0, 1), got {args.refiner_switch:g}")
        if args.image:
            raise UsageError("--refiner works with text-to-image only (no --image)")
    if (args.prompt_2 or args.negative_prompt_2) and not args.prompt:
        raise UsageError("--prompt-2 needs --prompt")
    for path, option in ((args.model, "--model"), (args.vae, "--vae"), (args.config, "--config"),
                         (args.refiner, "--refiner"), *((e, "--embedding") for e in args.embedding),
                         *((_parse_lora(spec)[0], "--lora") for spec in args.lora)):
        _check_exists(path, option)
    from sdjax import control_cli
    from sdjax.guidance import cli_options

    try:
        control_cli.check(args)
    except control_cli.UsageError as e:
        raise UsageError(str(e)) from None
    try:
        args.guidance_method = cli_options.build(args)
        if args.guidance_method is not None:
            args.guidance_method.check(get_sampler(sampler))
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    _check_writable_folder(out, "--out")


def _peek_configs(model: str | None) -> dict[str, Any]:
    """UNet / VAE configs and weight bytes of a model folder, read without loading it ({} for single files)."""
    from sdjax.hashes import weight_files
    from sdjax.loaders import DEFAULT_MODEL

    folder = Path(model) if model else DEFAULT_MODEL
    info: dict[str, Any] = {"params_bytes": sum(p.stat().st_size for p in weight_files(folder))}
    if folder.is_dir():
        for name in ("unet", "vae"):
            try:
                info[name] = json.loads((folder / name / "config.json").read_text())
            except (OSError, ValueError):
                pass
        try:
            info["index"] = json.loads((folder / "model_index.json").read_text())
        except (OSError, ValueError):
            pass
    return info


def _hires_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.hires_scale is None:
        return {}
    return {"hires_scale": args.hires_scale, "hires_strength": args.hires_strength,
            "hires_steps": args.hires_steps, "hires_upscaler": args.hires_upscaler}


def _base_size(args: argparse.Namespace, pipe: Any) -> tuple[int, int]:
    """(width, height) of the first pass."""
    return args.width or pipe.default_size, args.height or pipe.default_size


def _check_hires_size(args: argparse.Namespace, config: dict[str, Any], devices: list[Any]) -> None:
    """The hires size fits the format and the memory (the base size was checked already)."""
    from sdjax.hires import target_size
    from sdjax.images import MAX_SIZE

    if args.hires_scale is None:
        return
    unet, vae = config.get("unet") or {}, config.get("vae") or {}
    if args.height is None and not unet.get("sample_size"):
        return  # a single file: checked again once loaded
    factor = 2 ** (len(vae.get("block_out_channels") or (0, 0, 0, 0)) - 1)
    default = int(unet.get("sample_size") or 0) * factor
    height, width = target_size(args.height or default, args.width or default, args.hires_scale, factor)
    for name, value in (("height", height), ("width", width)):
        if value > MAX_SIZE[args.format]:
            raise UsageError(f"--hires-scale {args.hires_scale:g}: the hires {name} {value} is more than "
                             f"--format {args.format} stores ({MAX_SIZE[args.format]})")
    if min(height, width) < factor:
        raise UsageError(f"--hires-scale {args.hires_scale:g}: the hires size {width}x{height} is too small")
    try:
        _check_model(args, config, height, width, devices)
    except UsageError as e:
        raise UsageError(f"--hires-scale {args.hires_scale:g}: {e}") from None
    _check_hires_steps(args)


def _check_hires_steps(args: argparse.Namespace) -> None:
    """A1111's hires pass runs its steps at the end of a longer schedule, which the model's must cover."""
    from sdjax.hires import DEFAULT_STRENGTH, checked_hires_schedule
    from sdjax.loaders import DEFAULT_MODEL

    try:
        scheduler = json.loads((Path(args.model or DEFAULT_MODEL) / "scheduler" / "scheduler_config.json").read_text())
        limit = int(scheduler.get("num_train_timesteps", 1000))
    except (OSError, ValueError):
        limit = 1000  # single files: the SD families' count
    strength = args.hires_strength if args.hires_strength is not None else DEFAULT_STRENGTH
    try:
        checked_hires_schedule(args.hires_steps or args.steps, strength, limit)
    except ValueError as e:
        raise _hires_flags(e) from None


def _check_model(args: argparse.Namespace, config: dict[str, Any], height: int | None, width: int | None,
                 devices: list[Any], after_load: bool = False) -> None:
    """Checks that need the model's configs: before loading where they can be read, else right after."""
    from sdjax import memory

    unet = config.get("unet") or {}
    if unet.get("in_channels") == 9 and not args.mask:
        raise UsageError(f"--mask: {args.model} is an inpainting model (9-channel UNet); give --image and --mask")
    if args.refiner and unet and unet.get("addition_embed_type") != "text_time":
        raise UsageError(f"--refiner needs an SDXL base as --model; {args.model or DEFAULT_MODEL_NAME} is not")
    if height is None or width is None:
        if not unet.get("sample_size"):
            return
        height = width = int(unet["sample_size"]) * 8
    batch = min(args.batch_size or args.count, args.count)
    itemsize = 4 if args.dtype == "float32" else 2
    need = memory.estimate_bytes(config, batch, height, width, devices=len(devices), itemsize=itemsize,
                                 cfg=args.guidance > 1.0)
    have = memory.available_bytes(devices)
    if have is not None and need > have:
        raise UsageError(f"--height {height} --width {width} with a batch of {batch}: needs at least "
                         f"{memory.format_bytes(need)} per device, {memory.format_bytes(have)} available "
                         f"(lower --height/--width or --batch-size)")


# --- images in ----------------------------------------------------------------------------------------------

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


def _prepare_images(args: argparse.Namespace) -> tuple[Any, Any]:
    """Open --image / --mask and bring them to the requested size (A1111's resize modes) or to a multiple of
    8 (resized, with a notice)."""
    from sdjax.images import mask_warnings, nearest_multiple, resize_image

    if not args.image:
        return None, None
    image = _open_image(args.image, "--image")
    mask = _open_image(args.mask, "--mask") if args.mask else None
    if mask is not None and image.size != mask.size:
        raise UsageError(f"--image is {image.size[0]}x{image.size[1]} but --mask is "
                         f"{mask.size[0]}x{mask.size[1]}; they must have the same size")
    if mask is not None:
        for warning in mask_warnings(mask):
            _note(f"warning: --mask {warning}")
    if args.width is not None:
        size = (args.width, args.height)
    else:
        size = nearest_multiple(image.size, 8)
        if size != image.size:
            _note(f"note: --image is {image.size[0]}x{image.size[1]}, not a multiple of 8: resized to "
                  f"{size[0]}x{size[1]}")
    image = resize_image(image.convert("RGB"), *size, mode=args.resize_mode)
    if mask is not None:
        mask = resize_image(mask.convert("L"), *size, mode=args.resize_mode)
    return image, mask


# --- progress ------------------------------------------------------------------------------------------------

class Progress:
    """Sampling progress: a tqdm bar on a terminal, else a plain line every ``interval`` seconds (and at each
    batch's end). Counts from a batch's first finished step, so compile time never shows as a slow step."""

    def __init__(self, steps: int, batches: int, *, interval: float = 10.0, more_steps: int = 0) -> None:
        self.steps, self.batches, self.interval = steps, batches, interval
        self.more_steps = more_steps  # a second pass's steps per batch (the hires fix)
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.batch = 0
        self.batch_started = self.first_step_at = time.perf_counter()
        self.first_step: int | None = None
        self.last_print = 0.0

    def begin_batch(self) -> None:
        self.batch += 1
        self.batch_started = time.perf_counter()
        self.first_step: int | None = None

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        if self.first_step is None:  # image-to-image starts part-way through the schedule
            self.first_step, self.first_step_at = step, now
            if self.batch == 1 or now - self.batch_started > self.interval:
                _note(f"batch {self.batch}/{self.batches}: sampling ({now - self.batch_started:.1f} s to compile "
                      f"and run the first step)")
            if self.tty and self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=(total - step + 1 + self.more_steps) * self.batches, unit="step",
                                desc="sampling", file=sys.stderr)
        if self.bar is not None:
            self.bar.update(1)
        elif now - self.last_print >= self.interval or step == total:
            self.last_print = now
            done = step - self.first_step
            rate = f", {(now - self.first_step_at) / done:.2f} s/step" if done else ""
            _note(f"batch {self.batch}/{self.batches}: step {step}/{total}{rate}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _CompileClock:
    """Seconds JAX spends tracing and compiling, from its monitoring events."""

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        from sdjax.compile_cache import LOAD_EVENT

        if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/jaxpr_to_mlir_module_duration", LOAD_EVENT):
            self.seconds += duration


# --- generate ------------------------------------------------------------------------------------------------

def _load(model: str | None, args: argparse.Namespace, *, vae: str | None = None) -> Any:
    import jax.numpy as jnp

    import sdjax

    options: dict[str, Any] = {"dtype": getattr(jnp, args.dtype)}
    if args.prediction_type is not None:
        options["prediction_type"] = args.prediction_type
    if args.config is not None:
        options["config"] = args.config
    if vae is not None:
        options["vae"] = vae
    return sdjax.load(model, **options)


def _name(path: str | None) -> str:
    return Path(path).stem if path else DEFAULT_MODEL_NAME


def _decode(pipe: Any, latents: Any) -> list[Any]:
    """Final latents (diffusers layout) -> PIL images, with the pipeline's own decoder."""
    import numpy as np

    from sdjax.generation.host import decode

    return decode(pipe, np.ascontiguousarray(np.asarray(latents).transpose(0, 2, 3, 1)), "pil")


def _generate(args: argparse.Namespace) -> None:
    _check_args(args)
    from sdjax import warmup_cli

    warmup_cli.apply_cache_flags(args)  # the compile cache, on by default: before any compile
    image, mask = _prepare_images(args)
    height, width = (image.height, image.width) if image is not None else (args.height, args.width)
    import jax

    available = jax.devices()
    if args.devices is not None and args.devices > len(available):
        raise UsageError(f"--devices {args.devices}: only {len(available)} device(s) here")
    devices = available[: args.devices] if args.devices else available
    config = _peek_configs(args.model)
    _check_model(args, config, height, width, devices)
    _check_hires_size(args, config, devices)
    if args.refiner:
        _check_model(args, {**_peek_configs(args.refiner), "unet": None}, height, width, devices)

    from sdjax.guidance import cli_options
    from sdjax.hashes import short_hash
    from sdjax.images import save_image, write_new
    from sdjax.loaders import DEFAULT_MODEL
    from sdjax.parallel import data_mesh

    clock = _CompileClock()
    start = time.perf_counter()
    _note(f"hashing and loading {args.model or DEFAULT_MODEL_NAME}")
    names = Names(model=_name(args.model), model_hash=short_hash(args.model or DEFAULT_MODEL))
    pipe = _load(args.model, args, vae=args.vae)
    if args.ip_adapter:
        _note(f"loading IP-Adapter {args.ip_adapter}")
        pipe = pipe.with_ip_adapter(args.ip_adapter, image_encoder=args.image_encoder, scale=args.ip_scale)
    if args.vae:
        names.vae, names.vae_hash = _name(args.vae), short_hash(args.vae)
    if "unet" not in config:  # a single file: the checks that need its configs run now
        unet = dataclasses.asdict(pipe.unet.config)
        config = {"unet": unet, "vae": dataclasses.asdict(pipe.vae.config)}
        _check_model(args, config, height, width, devices)
        _check_hires_size(args, config, devices)
    if pipe.unet.config.in_channels == 9 and mask is None:
        raise UsageError(f"--mask: {names.model} is an inpainting model (9-channel UNet); give --image and --mask")
    if args.lora:
        from sdjax.convert.lora import apply_lora

        loras = [_parse_lora(spec) for spec in args.lora]
        _note(f"merging {len(loras)} LoRA(s)")
        pipe = apply_lora(pipe, loras)
        names.loras = [(_name(p), w, short_hash(p)) for p, w in loras]
    for path in args.embedding:
        pipe = pipe.with_embeddings(path)
        names.embeddings.append((_name(path), short_hash(path)))
    if args.tiling:
        pipe = pipe.with_tiling()
    prompt = args.prompt
    if args.prompt:
        from sdjax import extra_networks

        applied = extra_networks.apply(pipe, args.prompt, lora_dir=args.lora_dir,
                                       hypernetwork_dir=args.hypernetwork_dir)
        if applied.networks:
            _note(f"applying {', '.join(f'<{n.kind}:{n.name}>' for n in applied.networks)} from the prompt")
        pipe, prompt = applied.pipe, applied.prompts  # the metadata keeps the tags, as A1111's
        names.tag_loras = [(n.label, n.short_hash()) for n in applied.networks if n.kind == "lora"]
    refiner = None
    if args.refiner:
        _note(f"loading refiner {args.refiner}")
        refiner = _load(args.refiner, args)
        refiner = refiner.with_tiling() if args.tiling else refiner
        names.refiner, names.refiner_hash = _name(args.refiner), short_hash(args.refiner)
        if not pipe.is_sdxl:
            raise UsageError(f"--refiner needs an SDXL base as --model; {names.model} is not")
    args.model_schedule = pipe.scheduler.sigma_schedule
    _warn_about_source(args, names)
    load_seconds = time.perf_counter() - start

    mesh = data_mesh(devices) if args.devices else None
    options: dict[str, Any] = dict(
        negative_prompt=args.negative_prompt, num_steps=args.steps, guidance_scale=args.guidance,
        sampler=args.sampler, schedule=args.schedule, clip_skip=args.clip_skip,
        guidance_rescale=args.guidance_rescale, eta=args.eta, emphasis=args.emphasis,
    )
    if args.guidance_method is not None:  # a method from the guidance options replaces the plain CFG shorthand
        del options["guidance_scale"], options["guidance_rescale"]
        options["guidance"] = args.guidance_method
    from sdjax import control_cli

    try:
        control_options, control_fields = control_cli.options(args)
    except control_cli.UsageError as e:
        raise UsageError(str(e)) from None
    options.update(control_options)
    if mesh is not None:
        options["mesh"] = mesh
    if args.prompt_2 is not None:
        options["prompt_2"] = args.prompt_2
    if args.negative_prompt_2 is not None:
        options["negative_prompt_2"] = args.negative_prompt_2
    batch_size = min(args.batch_size or args.count, args.count)
    batches = -(-args.count // batch_size)
    progress = Progress(args.steps, batches,
                        more_steps=(args.hires_steps or args.steps) if args.hires_scale is not None else 0)
    options["progress"] = progress
    out_dir = Path(args.out)
    written: list[Path] = []
    compile_before = clock.seconds
    start = time.perf_counter()
    _note(f"compiling and sampling {args.count} image(s), {args.steps} steps of {args.sampler} "
          f"(the first run of a size, sampler and step count compiles)")
    want_latents = args.save_latents
    for first in range(0, args.count, batch_size):
        n = min(batch_size, args.count - first)
        prompts = [prompt] * n
        seed = args.seed + first  # image i of the request is the image seed + i gives alone
        progress.begin_batch()
        kind = "latent" if want_latents or refiner is not None else "pil"
        if refiner is not None:
            base = pipe.text_to_image(prompts, seed=seed, height=args.height, width=args.width,
                                      denoising_end=args.refiner_switch, output="latent", **options)
            result = refiner.image_to_image(prompts, base, seed=seed, denoising_start=args.refiner_switch,
                                            output="latent" if want_latents else "pil", **options)
            decoder = refiner
        elif image is None:
            result = pipe.text_to_image(prompts, seed=seed, height=args.height, width=args.width, output=kind,
                                        **options, **_hires_options(args))
            decoder = pipe
        elif mask is None:
            result = pipe.image_to_image(prompts, image, seed=seed, strength=_strength(args), output=kind,
                                         **options)
            decoder = pipe
        else:
            result = pipe.inpaint(prompts, image, mask, seed=seed, strength=_strength(args), output=kind,
                                  **options)
            decoder = pipe
        latents = result if want_latents else None
        pictures = _decode(decoder, result) if want_latents else result
        size = _base_size(args, pipe) if args.hires_scale is not None else None
        for i, picture in enumerate(pictures):
            width, height = size or (picture.width, picture.height)  # with hires: A1111's Size is the first pass's
            text = a1111_parameters(args, seed + i, width, height, names,
                                    extra={**cli_options.metadata(args), **control_fields})
            path = _write_numbered(out_dir, seed + i, args.format, lambda p, pic=picture, t=text: save_image(pic, p, t))
            written.append(path)
            if latents is not None:
                import numpy as np

                block = np.ascontiguousarray(latents[i: i + 1])
                write_new(path.with_suffix(".npy"), lambda f, b=block: np.save(f, b))
    progress.close()
    total = time.perf_counter() - start
    for path in written:
        print(path)
    if args.grid and len(written) > 1:
        from PIL import Image

        grid = _grid([Image.open(p) for p in written])
        index = written[0].name.split("-", 1)[0]
        grid_path = _write_new_name(out_dir / f"grid-{index}.{args.format}",
                                    lambda p: save_image(grid, p, None))
        print(grid_path)
    compile_seconds = clock.seconds - compile_before
    print(f"wrote {len(written)} image(s) to {out_dir}/; load {load_seconds:.1f} s, compile {compile_seconds:.1f} s, "
          f"generation {total - compile_seconds:.1f} s ({args.count} image(s), {args.steps} steps, seed "
          f"{args.seed})")


def _write_numbered(folder: Path, seed: int, fmt: str, write: Any) -> Path:
    """Write ``{index:05d}-{seed}.{fmt}`` with A1111's next free index; another process taking the same
    index first moves this one to the next."""
    from sdjax.images import next_index

    index = next_index(folder)
    while True:
        path = folder / f"{index:05d}-{seed}.{fmt}"
        try:
            write(path)
            return path
        except FileExistsError:
            index = max(index + 1, next_index(folder))


def _write_new_name(path: Path, write: Any) -> Path:
    stem, n = path.stem, 1
    while True:
        try:
            write(path)
            return path
        except FileExistsError:
            path = path.with_name(f"{stem}-{n}{path.suffix}")
            n += 1


def _grid(pictures: list[Any]) -> Any:
    from PIL import Image

    columns = min(len(pictures), 8)
    rows = -(-len(pictures) // columns)
    w, h = pictures[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, picture in enumerate(pictures):
        grid.paste(picture, ((i % columns) * w, (i // columns) * h))
    return grid


# --- main ---------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    # transformers is only our tokenizer here; its notice that PyTorch is missing is noise on the command line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Writes are atomic (images, latents, checkpoint folders): nothing half-written is left behind.
        print("\nsdjax: interrupted", file=sys.stderr, flush=True)
        if argv is None:
            # The real command line: background writers (orbax / tensorstore threads) now fail on the removed
            # temporary folder and print tracebacks from C++ threads; silence them, let them stop, remove what
            # they re-created, and skip exit handlers that would wait on or re-raise from them.
            sys.stdout.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            try:
                _settle_after_interrupt()
            finally:
                os._exit(130)
        _settle_after_interrupt()
        return 130


_WRITING_TO: list[Path] = []  # folders convert / export write, to clean once their writer threads stop


def _settle_after_interrupt(timeout: float = 5.0) -> None:
    """Let background writers (orbax's threads) run into the removed temporary folder and stop, without their
    tracebacks, then remove whatever they re-created."""
    import logging
    import threading

    threading.excepthook = lambda _: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    for out in _WRITING_TO:
        remove_stale_partials(out)


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from sdjax.convert.safe_load import CheckpointError
    from sdjax.convert.weights import WeightMismatchError
    from sdjax.models.config import ConfigError

    try:
        if args.command == "generate" and args.from_image:
            parser.generate_parser.set_defaults(**defaults_from_image(args.from_image))  # type: ignore[attr-defined]
            args = parser.parse_args(argv)
            if not args.image:
                args.strength = None  # the source's strength applies only when --image is given again
            elif not any(a.startswith("--hires") for a in (sys.argv[1:] if argv is None else argv)):
                # the source's hires fix applies to text-to-image only
                args.hires_scale = args.hires_strength = args.hires_steps = args.hires_upscaler = None
        args.run(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, ConfigError, CheckpointError,
            WeightMismatchError) as e:
        print(f"sdjax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
