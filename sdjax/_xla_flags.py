"""XLA CPU flags that pay off for the UNet (see PERF_NOTES): keep YNNPACK away from convs and dots.

Must run before JAX initialises its backend, so ``sdjax/__init__.py`` imports this first. Users who set their
own YNN fusion flag, or set ``SDJAX_KEEP_XLA_FLAGS=1``, are left alone.
"""

import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution"


def apply() -> None:
    if os.environ.get("SDJAX_KEEP_XLA_FLAGS"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()
