"""Timing shared by the benchmarks: each function called once untimed (first calls compile, allocate and start
threads), then ``repeats`` timed calls; the median of each.

By default each framework runs alone: its warm-up and repeats back to back. Alternating the two in one process
(``alternate=True``) spreads a slow patch of a shared machine over both, but measured on the 2-core host it
slowed PyTorch's UNet step by 20 % (7.66 -> 9.18 s) and sdjax's by 7 % (8.00 -> 8.58 s): each framework's
threads and allocations disturb the other's next call. So alternating flatters sdjax there."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_times(runs: dict[str, Callable[[], Any]], repeats: int,
                 warm_ups: dict[str, Callable[[], Any]] | None = None,
                 alternate: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """({name: median seconds}, {name: last output}). ``warm_ups``: a cheaper first call for some names (a
    2-step run instead of 20); the others warm up with their own function. ``alternate``: all warm-ups, then
    ``repeats`` rounds of one call each. Prints each call's time."""
    outputs: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}

    def call(name: str, fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        outputs[name] = fn()
        return time.perf_counter() - t

    groups = [list(runs)] if alternate else [[name] for name in runs]
    for names in groups:
        for name in names:
            print(f"  warm-up {name} {call(name, (warm_ups or {}).get(name, runs[name])):.2f} s", flush=True)
        for r in range(repeats):
            for name in names:
                times[name].append(call(name, runs[name]))
            print(f"  run {r + 1}: " + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in names), flush=True)
    return {name: statistics.median(t) for name, t in times.items()}, outputs
