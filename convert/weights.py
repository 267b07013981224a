"""Generic PyTorch state dict <-> Flax params mapping.

sdjax's Flax modules are named after the diffusers/transformers PyTorch keys, so the mapping is mechanical:
``down_blocks.0.resnets.1.conv1.weight`` becomes ``down_blocks_0/resnets_1/conv1/kernel`` (a number joins the
name before it, as Flax names list members), and the tensor is transposed into Flax's layout:

- Linear ``(out, in)`` -> Dense kernel ``(in, out)``
- Conv ``(out, in, kh, kw)`` -> Conv kernel ``(kh, kw, in, out)`` (NHWC / HWIO)
- a 1x1 Conv ``(out, in, 1, 1)`` feeding a Dense kernel (1x1 convs run as matmuls) -> ``(in, out)``
- norm weights -> ``scale``; embedding tables -> ``embedding`` (no transpose).

The expected parameter tree (from ``jax.eval_shape`` of the module's init) decides which of these applies and
every shape is checked. Missing, unexpected and wrongly shaped weights are reported together in one error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Params = dict[str, Any]

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
ALIGNMENT = 64  # bytes: XLA's CPU client uses a host array this aligned in place


def host_array(array: Any, dtype: Any = None) -> np.ndarray:
    """A read-only, C-contiguous copy of ``array`` (cast to ``dtype`` when given) whose data starts on a 64-byte
    boundary. ``jax.device_put`` on the CPU then aliases it instead of copying (numpy's own large arrays sit 16
    bytes past a page boundary, so they are copied), and a loaded model is held once in memory, not twice.
    Read-only because a placed array shares it."""
    array = np.asarray(array)
    dtype = np.dtype(dtype if dtype is not None else array.dtype)
    nbytes = array.size * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start:start + nbytes].view(dtype).reshape(array.shape)
    if array.ndim < 2:
        out[...] = array
    else:
        _copy_tiled(array, out)
    out.flags.writeable = False
    return out


_TILE = 64


def _copy_tiled(array: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = array`` over the last two axes in tiles: ~3x faster for transposed sources."""
    for index in np.ndindex(array.shape[:-2]):
        src, dst = array[index], out[index]
        for i in range(0, src.shape[0], _TILE):
            for j in range(0, src.shape[1], _TILE):
                dst[i:i + _TILE, j:j + _TILE] = src[i:i + _TILE, j:j + _TILE]


class WeightMismatchError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and wrongly shaped weight."""


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``"a.b.0.c.weight"`` -> ``("a", "b_0", "c", "weight")``."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


# PyTorch module names that really end in "_<digit>" (not list members), e.g. TimestepEmbedding's linear_1.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})


def torch_module_name(module: tuple[str, ...]) -> str:
    """``("a", "b_0", "c")`` -> ``"a.b.0.c"``: a Flax module path as the PyTorch module name."""
    return ".".join(name if name in LITERAL_NAMES else re.sub(r"_(\d+)$", r".\1", name) for name in module)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """``("a", "b_0", "c", "kernel")`` -> ``"a.b.0.c.weight"`` (inverse of :func:`torch_key_to_path`)."""
    return torch_module_name(path[:-1]) + (".bias" if path[-1] == "bias" else ".weight")


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _to_flax_layout(array: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    if leaf != "kernel":
        return array
    if array.ndim == 4 and len(shape) == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 4 and len(shape) == 2 and array.shape[2:] == (1, 1):
        return array[:, :, 0, 0].T
    if array.ndim == 2 and len(shape) == 2:
        return array.T
    return array


def _describe(path: tuple[str, ...]) -> str:
    return "/".join(path)


def to_flax_params(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
    dtype: Any = None,
    what: str = "model",
) -> Params:
    """Map a PyTorch-layout ``state_dict`` (name -> array) onto the ``expected`` Flax params tree.

    ``expected`` holds anything with ``.shape`` (e.g. ``jax.ShapeDtypeStruct``) at each leaf.
    ``ignore`` are regexes of source keys that are known buffers (e.g. ``position_ids``) and are skipped.
    ``rename`` rewrites a source key before mapping (used for key-prefix variants).
    Arrays are returned as numpy (:func:`host_array`), cast to ``dtype`` when given (else the source dtype is kept).
    """
    ignore_res = [re.compile(p) for p in ignore]
    targets = flatten(expected)
    result: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for key, value in state_dict.items():
        if any(r.search(key) for r in ignore_res):
            continue
        path = torch_key_to_path(rename(key) if rename else key)
        module, leaf = path[:-1], path[-1]
        if leaf == "weight":
            leaf = next((w for w in _WEIGHT_LEAVES if module + (w,) in targets), "kernel")
        target = module + (leaf,)
        if target not in targets:
            unexpected.append(key)
            continue
        shape = tuple(targets[target].shape)
        array = _to_flax_layout(np.asarray(value), leaf, shape)
        if tuple(array.shape) != shape:
            wrong_shape.append(f"{key}: checkpoint {tuple(np.shape(value))}, model expects {shape}")
            continue
        if target in result:
            unexpected.append(f"{key} (duplicate of {_describe(target)})")
            continue
        result[target] = host_array(array, dtype)
    missing = [_describe(p) for p in targets if p not in result and not any(
        _describe(p) in w for w in wrong_shape)]
    if unexpected or wrong_shape or missing:
        lines = [f"weights do not match the {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise WeightMismatchError("\n".join(lines))
    return unflatten(result)


def _to_torch_layout(array: np.ndarray, leaf: str, torch_shape: tuple[int, ...] | None) -> np.ndarray:
    if leaf != "kernel":
        return array
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        out = array.T
        if torch_shape is not None and len(torch_shape) == 4:
            out = out[:, :, None, None]
        return out
    return array


def from_flax_params(
    params: Mapping[str, Any], *, torch_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_flax_params`: Flax params -> PyTorch-layout state dict (numpy arrays).

    ``torch_shapes`` (key -> shape) disambiguates Dense kernels that PyTorch stores as 1x1 convs.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        key = path_to_torch_key(path)
        shape = torch_shapes.get(key) if torch_shapes else None
        out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), path[-1], shape))
    return out
