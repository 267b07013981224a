"""Data parallelism: a ``"data"`` mesh over every device, replicated params, sharded batches, per-image keys.

An image depends only on its seed: image i of a request with seed s draws from ``PRNGKey(s + i)``, so it is
the image seed s + i gives alone (A1111's convention). Batches are padded up to a multiple of the device
count (padding images are computed and dropped), so neither batch size nor device count changes any image.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over the given devices (default: all devices, every host)."""
    # Auto axes: XLA propagates the batch sharding through the model (every op is per-image).
    auto = (AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA,), axis_types=auto)
    return Mesh(np.asarray(devices), (DATA,), axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def image_keys(seed: int, indices: Any) -> np.ndarray:
    """One PRNG key per image: ``PRNGKey(seed + index)``, as raw uint32 keys of shape (B, 2).

    Computed on the host as threefry's seeding does (the high and low 32 bits of the seed), so seeds past
    2**32 (seed + index) stay exact.
    """
    seeds = int(seed) + np.asarray(indices, dtype=np.uint64)
    return np.stack([seeds >> np.uint64(32), seeds & np.uint64(0xFFFFFFFF)], axis=-1).astype(np.uint32)


def padded_size(batch: int, mesh: Mesh) -> int:
    n = mesh.shape[DATA]
    return -(-batch // n) * n


def pad_batch(tree: Any, size: int) -> Any:
    """Pad every array's leading axis to ``size`` by repeating its last entry."""

    def pad(x: Any) -> Any:
        x = np.asarray(x)
        extra = size - x.shape[0]
        return x if extra == 0 else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree)
