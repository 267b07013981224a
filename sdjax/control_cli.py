"""The command line's ControlNet / IP-Adapter options: parser group, checks before loading, task keywords and
the A1111 ControlNet extension's metadata ("ControlNet 0: ...")."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A bad control option (the CLI reports it with exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet and IP-Adapter")
    group.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]",
                     help="ControlNet (diffusers folder or A1111 control file), optional :SCALE; repeatable")
    group.add_argument("--control-image", action="append", default=[], metavar="IMG",
                     help="control image, one per --controlnet (one given is used for all)")
    group.add_argument("--control-preprocess", choices=("none", "canny", "lineart", "grayscale"), default="none",
                     help="turn --control-image into a control map first (canny: thresholds 100/200)")
    group.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps before ControlNet")
    group.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps ControlNet stops at")
    group.add_argument("--guess-mode", action="store_true", help="ControlNet on the conditional pass only")
    group.add_argument("--ip-adapter", metavar="PATH", help="ip-adapter*.safetensors / .bin file")
    group.add_argument("--ip-image", metavar="IMG", help="the IP-Adapter's image prompt")
    group.add_argument("--ip-scale", type=float, default=1.0, help="weight of the IP-Adapter's image prompt")
    group.add_argument("--image-encoder", metavar="FOLDER", help="CLIP vision folder for --ip-adapter "
                     "(h94's models/image_encoder)")
    for action in group._group_actions:  # every option's help names its default
        if action.help and "default" not in action.help:
            off = action.default in (None, False, [])
            action.help += " (default: off)" if off else f" (default: {action.default})"


def open_image(path: str, what: str) -> Any:
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: not an image ({e})") from None


def _controlnet_arg(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]``: a trailing ``:number`` is the scale (Windows drive letters stay in the path)."""
    path, sep, scale = value.rpartition(":")
    if sep and path and scale.replace(".", "", 1).isdigit():
        return path, float(scale)
    return value, 1.0


def check(args: argparse.Namespace) -> None:
    """The control options' checks, before anything is loaded (UsageError naming the option)."""
    if args.control_image and not args.controlnet:
        raise UsageError("--control-image needs --controlnet")
    if args.controlnet and not args.control_image:
        raise UsageError("--controlnet needs --control-image")
    if args.controlnet and len(args.control_image) not in (1, len(args.controlnet)):
        raise UsageError(f"{len(args.control_image)} --control-image for {len(args.controlnet)} --controlnet "
                         "(give one, or one per ControlNet)")
    if not 0.0 <= args.control_start < args.control_end <= 1.0:
        raise UsageError("--control-start/--control-end: need 0 <= start < end <= 1")
    for path, _ in map(_controlnet_arg, args.controlnet):
        if not Path(path).exists():
            raise UsageError(f"--controlnet {path!r} does not exist")
    if bool(args.ip_adapter) != bool(args.ip_image):
        raise UsageError("--ip-adapter and --ip-image go together")
    if args.ip_adapter and not args.image_encoder:
        raise UsageError("--ip-adapter needs --image-encoder FOLDER (the CLIP vision tower)")


def options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """(task keywords, A1111 ControlNet-extension metadata fields ``{"ControlNet i": '"..."'}``)."""
    import hashlib

    import sdjax
    from sdjax.preprocess import preprocess

    def short_hash(path: str) -> str:  # A1111's "[hash]": the first 8 hex digits of the file's sha256
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("diffusion_pytorch_model*.safetensors")) or sorted(p.glob("*.safetensors"))
            if not files:
                return ""
            p = files[0]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:8]

    options: dict[str, Any] = {}
    fields: dict[str, str] = {}
    mode = "ControlNet is more important" if args.guess_mode else "Balanced"
    if args.controlnet:
        specs = [_controlnet_arg(v) for v in args.controlnet]
        raw = [open_image(p, "--control-image") for p in args.control_image]
        maps = [preprocess(args.control_preprocess, im) for im in raw]
        maps = maps * len(specs) if len(maps) == 1 else maps
        options.update(controlnet=[sdjax.load_controlnet(p) for p, _ in specs], control_image=maps,
                       controlnet_conditioning_scale=[s for _, s in specs],
                       control_guidance_start=args.control_start, control_guidance_end=args.control_end,
                       guess_mode=args.guess_mode)
        for i, (path, scale) in enumerate(specs):
            thresholds = ", Threshold A: 100.0, Threshold B: 200.0" if args.control_preprocess == "canny" else ""
            module = args.control_preprocess if args.control_preprocess != "lineart" else "lineart_sobel"
            digest = short_hash(path)
            model = f"{Path(path).stem} [{digest}]" if digest else Path(path).stem
            fields[f"ControlNet {i}"] = (f'"Module: {module}, Model: {model}, Weight: {scale:g}, '
                          f'Resize Mode: Just Resize, Low Vram: False{thresholds}, Guidance Start: '
                          f'{args.control_start:g}, Guidance End: {args.control_end:g}, Pixel Perfect: False, '
                                         f'Control Mode: {mode}"')
    if args.ip_adapter:
        options.update(ip_adapter_image=open_image(args.ip_image, "--ip-image"), ip_adapter_scale=args.ip_scale)
        digest = short_hash(args.ip_adapter)
        stem = Path(args.ip_adapter).stem
        fields[f"ControlNet {len(fields)}"] = (f'"Module: ip-adapter_clip, Model: {stem} [{digest}], '
                      f'Weight: {args.ip_scale:g}, Resize Mode: Crop and Resize, Low Vram: False, '
                                               f'Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, '
                                               f'Control Mode: Balanced"')
    return options, fields
