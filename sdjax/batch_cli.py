"""``sdjax batch``: a prompt file (JSON lines) to a folder of images, resumable after a kill, on one or many hosts.

    sdjax batch --prompts jobs.jsonl --out DIR [--model M] [--on-error skip|stop] [--batch-size N]
                [--coordinator HOST:PORT --num-processes N --process-id I | --distributed auto]

Each line is one JSON object: ``sdjax.jobs.generate_many``'s keywords (``prompt``, ``negative_prompt``, ``seed``,
``height``, ``width``, ``num_steps``, ``guidance_scale``, ``sampler``, ...) plus ``num_images`` (default 1).
Image i of line L (1-based, counting every line of the file) has seed ``seed + i`` (``seed`` defaults to 0)
and is written as ``{L:06d}-{i:03d}.png``; the manifest (``manifest.jsonl``, or ``manifest.{I}.jsonl`` for
process I of several) gets one line per image as it lands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The line keys: text_to_image's keywords that JSON can carry, SDXL's options, and num_images.
LINE_KEYS = frozenset({
    "prompt", "negative_prompt", "num_steps", "guidance_scale", "guidance_rescale", "sampler", "schedule", "seed",
    "height", "width", "clip_skip", "eta", "emphasis", "denoising_end", "num_images",
    "prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
    "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
})
TUPLE_KEYS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
              "negative_crops_coords_top_left", "negative_target_size")
DEFAULT_SEED = 0


class JobError(ValueError):
    """A bad line or an inconsistent output folder (the CLI reports it as one message, exit status 2)."""


# The A1111 text writer of ``sdjax generate``, handed over by sdjax.cli when it registers this command (an
# import of sdjax.cli here would close an import cycle).
_WRITER: dict[str, Any] = {}


def add_commands(commands: Any, *, names: Any = None, parameters: Any = None) -> None:
    _WRITER.update(names=names, parameters=parameters)
    """Register ``sdjax batch`` on the ``sdjax`` parser's subcommands."""
    batch = commands.add_parser("batch", help="generate every image of a JSON-lines prompt file (resumable)")
    batch.add_argument("--model", help="diffusers folder, single-file checkpoint or sdjax checkpoint "
                                       "(default: the small model embedded in sdjax)")
    batch.add_argument("--prompts", required=True, help="JSON lines: one request per line")
    batch.add_argument("--out", required=True, help="output folder (created if missing)")
    batch.add_argument("--on-error", choices=("skip", "stop"), default="stop",
                       help="a bad line: report it and skip it, or report every bad line and stop before any work")
    batch.add_argument("--batch-size", type=int, help="images per compiled call (default: the local device count)")
    batch.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    batch.add_argument("--coordinator", help="HOST:PORT of process 0, for jax.distributed")
    batch.add_argument("--num-processes", type=int)
    batch.add_argument("--process-id", type=int)
    batch.add_argument("--distributed", choices=("auto",),
                       help="'auto': jax.distributed.initialize() finds its peers (TPU pods, SLURM)")
    from sdjax import warmup_cli

    warmup_cli.add_cache_flags(batch)
    batch.set_defaults(run=_run)


def _initialize_distributed(args: argparse.Namespace) -> None:
    flags = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed and any(f is not None for f in flags):
        raise JobError("--distributed auto finds its peers itself: give it without --coordinator/--num-processes/"
                       "--process-id")
    if any(f is not None for f in flags) and not all(f is not None for f in flags):
        raise JobError("give --coordinator, --num-processes and --process-id together")
    import jax

    if args.distributed:
        jax.distributed.initialize()
    elif args.coordinator:
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise JobError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, options) per non-blank line; (line number, error message) for a line that is not an object
    with known keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"--prompts {path} does not exist") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            options = json.loads(line)
        except json.JSONDecodeError as e:
            yield number, f"not JSON ({e})"
            continue
        if not isinstance(options, dict):
            yield number, f"expected a JSON object, got {type(options).__name__}"
            continue
        unknown = sorted(set(options) - LINE_KEYS)
        if unknown:
            yield number, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(LINE_KEYS))}"
            continue
        if not isinstance(options.get("prompt"), str):
            yield number, "prompt: one string per line (num_images for several images)"
            continue
        yield number, options


def image_name(line: int, image: int) -> str:
    return f"{line:06d}-{image:03d}.png"


def _request_options(options: dict[str, Any], image: int) -> dict[str, Any]:
    """generate_many's request for image ``image`` of a line alone: seed + image, one image."""
    request = {k: v for k, v in options.items() if k != "num_images"}
    for key in TUPLE_KEYS:
        if isinstance(request.get(key), list):
            request[key] = tuple(request[key])
    seed = options.get("seed", DEFAULT_SEED)
    request["seed"] = seed + image if image else seed  # image 0 keeps the value as given: Request checks it
    request["output"] = "pil"
    return request


def _parameters(options: dict[str, Any], seed: int, width: int, height: int, model_name: str) -> str:
    """The A1111 ``parameters`` text of one image, by the same writer as ``sdjax generate``."""
    names, a1111_parameters = _WRITER["names"], _WRITER["parameters"]
    args = types.SimpleNamespace(
        prompt=options["prompt"], negative_prompt=options.get("negative_prompt"),
        steps=options.get("num_steps", 30), sampler=options.get("sampler", "euler"),
        schedule=options.get("schedule"), guidance=options.get("guidance_scale", 7.5),
        clip_skip=options.get("clip_skip"), guidance_rescale=options.get("guidance_rescale", 0.0),
        eta=options.get("eta"), prompt_2=options.get("prompt_2"), negative_prompt_2=options.get("negative_prompt_2"),
        image=None, mask=None, strength=None, refiner_switch=None, dtype="float32",
        emphasis=options.get("emphasis", "original"),
    )
    return a1111_parameters(args, seed, width, height, names(model=model_name))  # seed + i alone gives the image


def _read_manifest(path: Path, *, truncate: bool) -> list[Any]:
    """The complete entries of a manifest; a last line cut short by a kill is dropped (and, with ``truncate``,
    cut from the file, so that appending starts on a fresh line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    entries, good = [], 0
    for raw in data.split(b"\n"):
        end = good + len(raw) + 1
        if end > len(data):  # no newline: a line still being written when the process died
            break
        try:
            entries.append(json.loads(raw))
        except json.JSONDecodeError:
            break
        good = end
    if truncate and good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return entries


def _append(manifest: Any, entry: dict[str, Any]) -> None:
    manifest.write(json.dumps(entry, sort_keys=True) + "\n")
    manifest.flush()
    os.fsync(manifest.fileno())


def _rewrite(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for entry in entries:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _expected_parameters(path: Path, options: dict[str, Any], seed: int, model_name: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _parameters(options, seed, im.width, im.height, model_name)
    except OSError:
        return None


def _png_parameters(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.text.get("parameters")
    except OSError:
        return None


class _Progress:
    """tqdm over images on a terminal; plain lines (images done, images/s) otherwise."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.total, self.done, self.start, self.fresh = total, done, time.perf_counter(), 0
        self.bar = tqdm(total=total, initial=done, unit="image", desc="batch") if self.tty else None

    def update(self, n: int) -> None:
        self.done += n
        self.fresh += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            rate = self.fresh / max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.done}/{self.total} images, {rate:.2f} images/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise JobError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} exists and is not a folder")
    lines = list(read_lines(Path(args.prompts)))
    _initialize_distributed(args)
    from sdjax import warmup_cli

    warmup_cli.apply_cache_flags(args)  # before any compile: JAX fixes its cache folder then

    import jax
    import jax.numpy as jnp

    import sdjax
    from sdjax import jobs, parallel
    from sdjax.images import save_png

    pipe = sdjax.load(args.model, dtype=getattr(jnp, args.dtype))
    model_name = Path(args.model).stem if args.model else "sdjax-default"

    # Every line is checked against the model before anything is generated.
    good: dict[int, dict[str, Any]] = {}
    bad: list[tuple[int, str]] = []
    for number, options in lines:
        if isinstance(options, str):
            bad.append((number, options))
            continue
        try:
            n = options.get("num_images", 1)
            jobs.check(pipe, _request_options(options, 0) | {"num_images": n})
            seed = options.get("seed", DEFAULT_SEED)
            if isinstance(seed, int) and isinstance(n, int) and seed + n > 2**32:
                raise ValueError(f"seed + num_images must stay below 2**32 (seed {seed}, {n} images)")
        except (ValueError, TypeError) as e:
            bad.append((number, str(e)))
            continue
        good[number] = options
    for number, message in bad:
        verb = "skipped" if args.on_error == "skip" else "error"
        print(f"sdjax batch: {args.prompts}:{number}: {verb}: {message}", file=sys.stderr)
    if bad and args.on_error == "stop":
        raise JobError(f"{len(bad)} bad line(s) in {args.prompts} (lines {', '.join(str(n) for n, _ in bad)}); "
                       "nothing generated (--on-error skip generates the others)")

    # This process's share: lines by number modulo the process count.
    count, me = jax.process_count(), jax.process_index()
    mine = {number: options for number, options in good.items() if (number - 1) % count == me}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / ("manifest.jsonl" if count == 1 else f"manifest.{me}.jsonl")

    units = [(number, i) for number, options in mine.items() for i in range(options.get("num_images", 1))]
    names = {image_name(number, i): (number, i) for number, i in units}
    for stale in out.glob(".*.tmp"):  # half-written images of a killed run (this process's only)
        if stale.name[1:].split(".png.")[0] + ".png" in names:
            stale.unlink(missing_ok=True)

    # Reconcile the manifest with the files: an entry without its file is redone, a file without an entry gets
    # one, an image of other settings (a listed one: by its entry; else by its PNG metadata) stops the job:
    # images are never overwritten.
    own_raw = _read_manifest(manifest_path, truncate=True)
    own: list[dict[str, Any]] = []
    listed: dict[str, dict[str, Any]] = {}
    for entry in own_raw:
        file = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(file, str) and file not in listed and (out / file).exists():
            own.append(entry)
            listed[file] = entry
    if len(own) != len(own_raw):
        _rewrite(manifest_path, own)
    for other in out.glob("manifest*.jsonl"):  # other processes' (maybe still running: read, never truncate)
        if other != manifest_path:
            for entry in _read_manifest(other, truncate=False):
                if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    listed.setdefault(entry["file"], entry)
    todo = []
    with open(manifest_path, "a") as manifest:
        for number, i in units:
            name = image_name(number, i)
            path = out / name
            if not path.exists():
                todo.append((number, i))
                continue
            expected = _entry(number, i, name, mine[number], None)
            if name in listed:
                same = all(listed[name].get(k) == expected[k] for k in ("line", "image", "seed", "settings"))
            else:
                found = _png_parameters(path)  # None: unreadable, so not one of ours (ours land whole)
                same = found is not None and found == _expected_parameters(path, mine[number], expected["seed"],
                                                                             model_name)
            if not same:
                raise JobError(f"{path} exists but was not made from line {number} of {args.prompts}; "
                               "use another --out (images are never overwritten)")
            if name not in listed:
                _append(manifest, expected)

    mesh = parallel.data_mesh(jax.local_devices())
    progress = _Progress(len(units), len(units) - len(todo))
    requests = (_request_options(mine[number], i) for number, i in todo)
    with open(manifest_path, "a") as manifest:
        for result in jobs.generate_many(pipe, requests, batch_size=args.batch_size, mesh=mesh):
            number, i = todo[result.index]
            name = image_name(number, i)
            options = mine[number]
            picture = result.image
            save_png(picture, out / name, _parameters(options, result.seed, picture.width, picture.height,
                                                      model_name))
            _append(manifest, _entry(number, i, name, options, result.elapsed))
            progress.update(1)
    progress.close()
    skipped = f", {len(bad)} bad line(s) skipped" if bad else ""
    where = f" (process {me} of {count})" if count > 1 else ""
    print(f"{len(units)} image(s) in {out}/{where}: {len(todo)} generated now{skipped}")


def _entry(number: int, i: int, name: str, options: dict[str, Any], elapsed: float | None) -> dict[str, Any]:
    settings = {k: v for k, v in options.items() if k != "num_images"}
    return {"line": number, "image": i, "file": name, "seed": options.get("seed", DEFAULT_SEED) + i,
            "settings": settings, "elapsed": elapsed}
