"""``sdjax warmup``: fill the compile cache ahead of a job, and the cache flags every generating command takes.

Registered by the CLI with ``warmup_cli.add_commands(subparsers)``; ``add_cache_flags(parser)`` and
``apply_cache_flags(args)`` give ``generate`` / ``batch`` the same ``--cache-dir`` / ``--no-cache``.

Warm-up runs one throwaway generation of the given shape (its images are dropped): that compiles and stores
exactly the executables a later run with the same model, size, steps, sampler, guidance and batch looks up.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

_SIZE = re.compile(r"^(\d+)[xX](\d+)$")


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="compile cache folder (default: $SDJAX_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/sdjax/jax or ~/.cache/sdjax/jax)")
    parser.add_argument("--no-cache", action="store_true", help="compile from scratch; write no cache "
                        "(also SDJAX_NO_CACHE=1) (default: the cache is on)")


def apply_cache_flags(args: argparse.Namespace) -> Any:
    """Turn the compile cache on unless ``--no-cache``; returns the folder or None. Call before loading."""
    from sdjax import compile_cache

    if args.no_cache:
        return None
    return compile_cache.enable(args.cache_dir)


def _size(value: str) -> tuple[int, int]:
    m = _SIZE.match(value)
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


def add_commands(subparsers: Any) -> None:
    warm = subparsers.add_parser("warmup", help="compile ahead into the cache for a model, size, steps and sampler")
    warm.add_argument("--model", help="as for generate (default: the built-in model)")
    warm.add_argument("--size", type=_size, action="append",
                      help="WIDTHxHEIGHT (repeat for several; default: the model's own size)")
    warm.add_argument("--steps", type=int, default=30)
    warm.add_argument("--sampler", action="append", help="repeat for several (default: euler)")
    warm.add_argument("--schedule", choices=("default", "karras", "exponential"))
    warm.add_argument("--guidance", type=float, default=7.5, help="> 1: classifier-free guidance (two passes)")
    warm.add_argument("--batch-size", type=int, default=1, help="images per batch the job will use")
    warm.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    add_cache_flags(warm)
    warm.set_defaults(run=warmup)


def warmup(args: argparse.Namespace) -> None:
    if args.no_cache:
        raise ValueError("--no-cache: warmup only fills the cache")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    import jax.numpy as jnp

    from sdjax.samplers.registry import get_sampler

    samplers = args.sampler or ["euler"]
    for name in samplers:
        get_sampler(name)  # an unknown name fails before the model loads
    folder = apply_cache_flags(args)
    if folder is None:
        raise ValueError("SDJAX_NO_CACHE is set: warmup only fills the cache")
    import sdjax
    from sdjax import compile_cache

    pipe = sdjax.load(args.model, dtype=getattr(jnp, args.dtype))
    sizes = args.size or [(pipe.default_size, pipe.default_size)]
    for width, height in sizes:
        for name in samplers:
            start = time.perf_counter()
            before = compile_cache.stats["misses"]
            pipe.text_to_image(["warm-up"] * args.batch_size, num_steps=args.steps, sampler=name,
                               schedule=args.schedule, guidance_scale=args.guidance, height=height, width=width,
                               output="np")
            stored = compile_cache.stats["misses"] - before
            print(f"{width}x{height} {name} {args.steps} steps batch {args.batch_size}: "
                  f"{'compiled and stored' if stored else 'already cached'} ({time.perf_counter() - start:.1f} s)")
    print(f"cache: {folder}")
    sys.stdout.flush()
