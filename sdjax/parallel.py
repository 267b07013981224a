"""Data parallelism: a ``"data"`` mesh over every device, replicated params, sharded batches, per-image keys.

Params too big for one device: ``mesh(data=D, fsdp=F)`` adds a second axis ``"fsdp"``; :func:`param_shardings`
splits each param's largest axis that F divides over it (replicated over ``"data"``), and XLA gathers the
pieces where they are used. The batch stays sharded over ``"data"`` only.

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
FSDP = "fsdp"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over the given devices (default: all devices, every host)."""
    # Auto axes: XLA propagates the batch sharding through the model (every op is per-image).
    auto = (AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA,), axis_types=auto)
    return Mesh(np.asarray(devices), (DATA,), axis_types=auto)


def mesh(data: int | None = None, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh of ``data * fsdp`` devices (``data`` default: all the devices ``fsdp``
    leaves); ``fsdp=1`` is :func:`data_mesh`. Params placed on it are sharded over ``"fsdp"``."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp!r}: must be a positive integer dividing the {len(devices)} devices")
    data = len(devices) // fsdp if data is None else data
    if not isinstance(data, int) or data < 1 or data * fsdp > len(devices):
        raise ValueError(f"data={data!r}, fsdp={fsdp}: needs data * fsdp <= {len(devices)} devices")
    if fsdp == 1:
        return data_mesh(devices[:data])
    grid = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp_size(mesh: Mesh) -> int:
    return mesh.shape.get(FSDP, 1)


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """The largest axis that the ``"fsdp"`` size divides goes over ``"fsdp"``; small or indivisible params
    (norms, biases of odd sizes) stay replicated."""
    n = fsdp_size(mesh)
    axes = [a for a in range(len(shape)) if shape[a] % n == 0 and shape[a] >= n]
    if n == 1 or not axes:
        return replicated(mesh)
    axis = max(axes, key=lambda a: (shape[a], -a))
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return NamedSharding(mesh, P(*spec))


def place_params(params: Any, mesh: Mesh) -> Any:
    """Params on the mesh: replicated, or sharded over ``"fsdp"`` when the mesh has that axis."""
    if fsdp_size(mesh) == 1:
        return jax.device_put(params, replicated(mesh))
    return jax.tree.map(lambda x: jax.device_put(x, param_sharding(mesh, np.shape(x))), params)


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
