"""Sampler names as users type them: sdjax's own ("dpmpp_2m") and AUTOMATIC1111's ("DPM++ 2M Karras").

An A1111 name is a sampler plus, optionally, a sigma schedule suffix (" Karras", " Exponential"); the table is
derived from the registry's ``a1111`` field and ``SIGMA_SCHEDULE_INFO``, so a sampler added there is named here.
Matching ignores case and surrounding spaces.
"""

from __future__ import annotations

import difflib

from sdjax.samplers.registry import SAMPLERS, SIGMA_SCHEDULE_INFO


def _a1111_table() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {}
    for name, sampler in SAMPLERS.items():
        if sampler.a1111 is None:
            continue
        for schedule in sampler.sigma_schedules:
            suffix = SIGMA_SCHEDULE_INFO[schedule]["a1111"]
            # A bare A1111 name ("Euler") is the sampler on the model's own schedule, as in the web UI.
            table[sampler.a1111 + suffix] = (name, schedule if suffix else None)
        table.setdefault(sampler.a1111, (name, None))
    return table


A1111_NAMES: dict[str, tuple[str, str | None]] = _a1111_table()
_BY_KEY: dict[str, tuple[str, str | None]] = {
    **{k.lower(): v for k, v in A1111_NAMES.items()},
    **{name.lower(): (name, None) for name in SAMPLERS},
}


def all_names() -> list[str]:
    """Every accepted spelling (sdjax names first), for listings and suggestions."""
    return [*SAMPLERS, *A1111_NAMES]


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """``"Euler a"`` -> ``("euler_a", None)``, ``"DPM++ 2M Karras"`` -> ``("dpmpp_2m", "karras")``; sdjax names
    map to themselves. The schedule is None where the name implies none (the model's own is used). Unknown
    names raise ValueError naming the closest match."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name, got {name!r}")
    found = _BY_KEY.get(" ".join(name.split()).lower())
    if found is not None:
        return found
    close = difflib.get_close_matches(name.lower(), list(_BY_KEY), n=1, cutoff=0.5)
    hint = ""
    if close:
        spelled = {k.lower(): k for k in all_names()}[close[0]]
        hint = f"; did you mean {spelled!r}?"
    raise ValueError(f"unknown sampler {name!r}{hint} (valid: {', '.join(SAMPLERS)}, or an A1111 name such as "
                     f"'DPM++ 2M Karras'; `sdjax --list-samplers` lists them all)")


def a1111_name(sampler: str, schedule: str | None) -> str:
    """The name A1111 writes for ``sampler`` on sigma ``schedule`` (sdjax's name where A1111 has none)."""
    base = SAMPLERS[sampler].a1111 or sampler
    return base + SIGMA_SCHEDULE_INFO.get(schedule or "default", {"a1111": ""})["a1111"]
