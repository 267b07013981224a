"""Read checkpoint files into ``{name: numpy array}`` without ever running code from them.

- ``.safetensors`` is parsed here (8-byte header length, JSON header, raw little-endian bytes) and memory-mapped,
  so it needs neither torch nor a copy; bf16 and fp8 tensors come back as ``ml_dtypes`` arrays.
- Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) go only through
  ``torch.load(..., weights_only=True)``, whose unpickler refuses every global that is not a tensor rebuilder.
  Plain ``pickle`` is never used.

The file's content decides the format, not its extension: a renamed ``.ckpt`` that is really safetensors still
loads, and a PNG named ``model.safetensors`` gets a clear error.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["Checkpoint", "CheckpointError", "read_checkpoint", "read_state_dict"]

# safetensors dtype names -> numpy dtypes (the format is little-endian by definition).
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# Headers of real checkpoints are a few hundred KB; anything this large is not a safetensors header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# Keys under which training frameworks nest the weights (Lightning: "state_dict"; others: "model").
_NESTING_KEYS = ("state_dict", "model")


class CheckpointError(ValueError):
    """A file could not be read as a checkpoint, or a checkpoint does not have the layout we expected."""


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of a checkpoint file plus the little non-tensor information worth keeping."""

    state_dict: dict[str, np.ndarray]
    # Training step stored in Lightning .ckpt files; SD2's v-prediction heuristic uses it. None when absent.
    global_step: int | None = None
    # The free-form string metadata of a safetensors header (empty for pickled files).
    metadata: dict[str, str] = field(default_factory=dict)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` file into ``{key: numpy array}``."""
    return read_checkpoint(path).state_dict


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Like :func:`read_state_dict`, also returning ``global_step`` and safetensors metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("zip", "pickle"):
        return _read_pickled(path, is_zip=kind == "zip")
    raise CheckpointError(f"{path}: not a checkpoint ({kind}); expected a safetensors or PyTorch checkpoint file")


# --- format sniffing ---------------------------------------------------------------------------------------------

_MAGIC_DESCRIPTIONS = (
    (b"\x89PNG", "looks like a PNG image"),
    (b"\xff\xd8\xff", "looks like a JPEG image"),
    (b"GIF8", "looks like a GIF image"),
    (b"RIFF", "looks like a RIFF/WebP file"),
    (b"\x1f\x8b", "looks like a gzip archive"),
    (b"version https://git-lfs", "looks like a Git LFS pointer, not the weights it points to"),
)


def is_torch_pickle(path: str | os.PathLike) -> bool:
    """Whether the file, by its content, is a ``torch.save`` pickle (zip or legacy format)."""
    return _sniff(Path(path)) in ("zip", "pickle")


def _sniff(path: Path) -> str:
    """Return "safetensors", "zip" (torch.save), "pickle" (legacy torch.save) or a description of what it is."""
    with path.open("rb") as f:
        head = f.read(64)
    size = path.stat().st_size
    if not head:
        return "the file is empty"
    if size < 9:
        return f"the file is only {size} bytes long"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # Pickle protocol 2+ starts with PROTO <version>; legacy torch.save files are a pickle stream.
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    # safetensors: u64 header length, then the JSON header (a truncated file is reported by the reader).
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and header_len <= _MAX_HEADER_BYTES:
        return "safetensors"
    for magic, description in _MAGIC_DESCRIPTIONS:
        if head.startswith(magic):
            return description
    if _looks_like_text(head):
        return "looks like a text file"
    return "unrecognised content: neither a safetensors header nor a zip/pickle stream"


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 0x20 or b in b"\t\r\n" for b in head)


# --- safetensors -------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> Checkpoint:
    size = path.stat().st_size
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header needs {header_len} bytes, file has {size - 8})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    # One read-only map of the whole file; every tensor is a view into it (no copy of multi-GB files).
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if data_len > 0 else np.zeros(0, np.uint8)
    state_dict = {
        name: _safetensors_tensor(path, name, info, buffer, data_start, data_len) for name, info in header.items()
    }
    return Checkpoint(state_dict=state_dict, metadata={str(k): str(v) for k, v in metadata.items()})


def _safetensors_tensor(
    path: Path, name: str, info: Any, buffer: np.ndarray, data_start: int, data_len: int
) -> np.ndarray:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    dtype = _SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported safetensors dtype {dtype_name!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of the data section, "
            f"which has only {data_len} bytes)"
        )
    if begin < 0 or end - begin != expected:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor {name!r} of shape {shape} and dtype {dtype_name} "
            f"needs {expected} bytes but spans {end - begin}"
        )
    raw = buffer[data_start + begin : data_start + end]
    return raw.view(dtype).reshape(shape)


# --- pickled (torch.save) ----------------------------------------------------------------------------------------


def _read_pickled(path: Path, is_zip: bool) -> Checkpoint:
    state, global_step = _unwrap(load_pickle(path, is_zip=is_zip), path)
    return Checkpoint(state_dict=_tensors_to_numpy(state, path), global_step=global_step)


def load_pickle(path: str | os.PathLike, *, is_zip: bool | None = None) -> Any:
    """The object in a PyTorch pickle (tensors, nested dicts, numbers), read only through torch's weights-only
    unpickler; anything else in it is refused with :class:`CheckpointError` and nothing in it runs."""
    path = Path(path)
    if is_zip is None:
        is_zip = _sniff(path) == "zip"
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: PyTorch is needed to read pickled checkpoints (.ckpt/.pt/.pth/.bin); install torch, "
            "or use a .safetensors file, which needs no PyTorch"
        ) from None

    try:
        # weights_only=True: torch's restricted unpickler, which refuses any global that is not a tensor
        # rebuilder. Passing it explicitly also stops TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD from overriding it.
        if path.suffix == ".safetensors":  # torch.load would hand a path with this suffix to safetensors
            with path.open("rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:  # mmap: tensors stay on disk until used (zip format only)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if not is_zip and _pickle_stream_is_cut_short(path):  # a cut-off GLOBAL looks like an unknown one
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (its pickle ends early)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it would import {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refusing to load: the file contains code or objects that are not tensors{what}. "
            "Loading it could run arbitrary code. Use a .safetensors version, or convert it with a tool you "
            "trust in an isolated environment."
        ) from None
    except Exception as e:  # torch reports truncation as RuntimeError, EOFError, OSError, struct.error, ...
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {e})") from None
    return obj


def _pickle_stream_is_cut_short(path: Path) -> bool:
    """Whether the file's pickles end before their STOP opcodes (parses opcodes only, runs nothing)."""
    with path.open("rb") as f:
        for _ in range(5):  # legacy torch.save: magic number, protocol, sys info, object, storage keys
            if not f.read(1):
                return False
            f.seek(-1, os.SEEK_CUR)
            try:
                for _op in pickletools.genops(f):
                    pass
            except ValueError:
                return True
    return False


def _unwrap(obj: Any, path: Path) -> tuple[Mapping[str, Any], int | None]:
    """Descend through ``{"state_dict": {...}}`` / ``{"model": {...}}`` nesting, picking up ``global_step``."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a state dict (the file holds a {type(obj).__name__}, not a dict)")
    global_step = None
    while True:
        step = obj.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            global_step = step
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            return obj, global_step
        obj = nested


def _tensors_to_numpy(state: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):  # non-tensors (epoch, global_step, optimizer state) are dropped
            out[str(key)] = _tensor_to_numpy(value, str(key), path)
    if not out:
        raise CheckpointError(f"{path}: no tensors found (keys: {_preview(list(state))})")
    return out


def _tensor_to_numpy(t: Any, key: str, path: Path) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    # numpy has no bf16/fp8: reinterpret the bits through an integer view as the matching ml_dtypes type.
    reinterpret = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in reinterpret:
        int_dtype, np_dtype = reinterpret[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype)
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {t.dtype}") from None


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(map(repr, keys[:limit]))
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
