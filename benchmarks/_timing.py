"""Timing shared by the benchmarks: each function called once untimed (first calls compile, allocate and start
threads), then ``repeats`` rounds of all of them in turn, so that a slow patch of a shared machine hits both
frameworks alike; the median of each."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def round_robin(runs: dict[str, Callable[[], Any]], repeats: int,
                warm_ups: dict[str, Callable[[], Any]] | None = None,
                interleave: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """({name: median seconds}, {name: last output}). ``warm_ups``: a cheaper first call for some names (a
    2-step run instead of 20); the others warm up with their own function. ``interleave=False``: each name's
    warm-up and repeats back to back instead (nothing of the other framework runs in between: its threads may
    still be busy right after its call). Prints each call's time."""
    outputs: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}

    def call(name: str, fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        outputs[name] = fn()
        return time.perf_counter() - t

    groups = [list(runs)] if interleave else [[name] for name in runs]
    for names in groups:
        for name in names:
            print(f"  warm-up {name} {call(name, (warm_ups or {}).get(name, runs[name])):.2f} s", flush=True)
        for r in range(repeats):
            for name in names:
                times[name].append(call(name, runs[name]))
            print(f"  run {r + 1}: " + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in names), flush=True)
    return {name: statistics.median(t) for name, t in times.items()}, outputs
