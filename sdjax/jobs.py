"""Many requests, one stream of images: requests that share a compiled plan run together in device-sized batches.

    for result in sdjax.jobs.generate_many(pipe, [{"prompt": "a red circle", "seed": 1, "num_images": 4},
                                                  {"prompt": "a blue square", "height": 64, "width": 96}]):
        result.image.save(f"{result.index}-{result.image_index}.png")

Every image is made from its own key (``PRNGKey(seed + i)`` for image i of a request), so it is the image the
request gives alone, whatever batch it lands in (up to float rounding of a batch of another size).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from sdjax import images, parallel
from sdjax.generation import host
from sdjax.generation.request import Request

PROMPT_KEYS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")  # repeated per image by num_images


@dataclasses.dataclass(frozen=True)
class Result:
    """One image of one request."""

    index: int  # the request's position in the iterable given to generate_many
    image_index: int  # the image's position within its request (its batch of prompts times num_images)
    seed: int  # the seed that gives this image alone (the request's seed + image_index)
    request: Request
    image: Any  # as request.output: a PIL image, (H, W, 3) float32 in [0, 1], or (C, h, w) latents
    elapsed: float  # seconds the batch that made this image took (generation and decoding)


def to_request(item: Mapping[str, Any] | Request) -> Request:
    """A :class:`Request` from a dict of ``Pipeline.text_to_image``'s keywords (plus ``task``: "text", "image" or
    "inpaint", and ``num_images``: images per prompt, in diffusers' ``num_images_per_prompt`` order)."""
    if isinstance(item, Request):
        return item
    if not isinstance(item, Mapping):
        raise TypeError(f"a request is a dict of keywords or a Request, got {type(item).__name__}")
    options = dict(item)
    task = options.pop("task", "text")
    if "prompt" not in options:
        raise ValueError("prompt is missing")
    n = options.pop("num_images", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images must be a positive integer, got {n!r}")
    if n > 1:
        for key in PROMPT_KEYS:
            value = options.get(key)
            if isinstance(value, str):
                options[key] = [value] * n
            elif isinstance(value, list | tuple):
                options[key] = [v for v in value for _ in range(n)]
    return Request.build(task, options.pop("prompt"), **options)


def check(pipe: Any, item: Mapping[str, Any] | Request) -> Request:
    """The request, checked against ``pipe`` as generation would (sizes, clip_skip, SDXL options, sweeps) without
    running anything: raises the error generation would."""
    return _prepare(pipe, item)[0]


def _prepare(pipe: Any, item: Mapping[str, Any] | Request) -> tuple[Request, host.Prepared]:
    request = to_request(item)
    if request.sweep is not None:
        raise ValueError("guidance sweeps (a list of settings) are not supported in batch jobs; "
                         "give one request per setting")
    return request, host.prepare(pipe, request)


def generate_many(pipe: Any, requests: Iterable[Mapping[str, Any] | Request], *, batch_size: int | None = None,
                  mesh: Any = None) -> Iterator[Result]:
    """Generate every image of every request, yielding each :class:`Result` as its batch finishes.

    Images whose preparations share a compiled call (same plan: task, sampler, schedule, steps, size, ...; same
    text chunk count; equal guidance numbers and eta) are grouped into batches of ``batch_size`` images
    (default: the mesh's device count; rounded up to a multiple of it). A batch runs as soon as it is full;
    when the requests run out, the partial batches run in the order of their oldest image, padded to the full
    size (the padding's images are computed and discarded, so every batch of a group has one shape and one
    compile). Within a batch, results come in request order. Requests are read lazily, so the iterable may be
    a generator over millions of lines; a bad request raises when it is reached (use :func:`check` first to
    validate everything up front).

    ``mesh``: a ``"data"`` mesh (default: every device). On several hosts, give a per-process mesh over
    ``jax.local_devices()`` to have each process generate its own requests (as ``sdjax batch`` does).
    """
    mesh = mesh or parallel.data_mesh()
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    size = parallel.padded_size(batch_size or mesh.shape[parallel.DATA], mesh)
    pending: dict[Any, list[tuple[Result, host.Prepared]]] = {}
    for index, item in enumerate(requests):
        request, prepared = _prepare(pipe, item)
        for i, part in enumerate(host.split(prepared)):
            key = host.batch_key(part)
            label = Result(index, i, request.seed + i, request, None, 0.0)
            pending.setdefault(key, []).append((label, part))
            if len(pending[key]) == size:
                yield from _run_batch(pipe, pending.pop(key), size, mesh)
    for key in list(pending):  # dicts keep insertion order: the group whose oldest image came first runs first
        yield from _run_batch(pipe, pending.pop(key), size, mesh)


def _run_batch(pipe: Any, items: list[tuple[Result, host.Prepared]], size: int, mesh: Any) -> Iterator[Result]:
    start = time.perf_counter()
    parts = [part for _, part in items]
    parts += [parts[-1]] * (size - len(parts))  # a short tail: padded, so the batch keeps its compiled shape
    latents = host.execute(pipe, host.concat(parts), mesh=mesh)
    outputs = {label.request.output for label, _ in items}
    pixels = host.decode(pipe, latents, "np") if outputs & {"np", "pil"} else None
    raw = host.decode(pipe, latents, "latent") if "latent" in outputs else None
    elapsed = time.perf_counter() - start
    for j, (label, _) in enumerate(items):
        output = label.request.output
        if output == "latent":
            image: Any = raw[j]
        elif output == "pil":
            image = images.to_pil(np.asarray(pixels[j:j + 1]))[0]
        else:
            image = pixels[j]
        yield dataclasses.replace(label, image=image, elapsed=elapsed)
