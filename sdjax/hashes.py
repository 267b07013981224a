"""Short weight hashes as AUTOMATIC1111 writes them (``Model hash``, ``Lora hashes``): the first 10 hex digits
of the SHA-256 of the file.

A folder (diffusers or sdjax checkpoint) has no single file, so its hash is the SHA-256 of its weight files'
bytes, fed in the order of their paths relative to the folder (``unet/...`` after ``text_encoder/...``):
files ending in .safetensors, .bin, .ckpt, .pt, .pth, .msgpack, and everything under an sdjax checkpoint's
``params/``. Configs and tokenizers are left out. Results are cached by path, size and modification time in
``$XDG_CACHE_HOME/sdjax/hashes.json`` (``~/.cache``), as hashing a 7 GB checkpoint takes seconds.

LoRAs named by prompt tags are recorded as A1111 records them: :func:`lora_short_hash` (12 digits of kohya's
"addnet" hash for safetensors files).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack")
_BLOCK = 1 << 20


def weight_files(path: Path) -> list[Path]:
    """The files a hash of ``path`` covers, in hashing order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
             and (p.suffix in WEIGHT_SUFFIXES or "params" in p.relative_to(path).parts[:1])]
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def short_hash(path: str | Path) -> str:
    """A1111's 10-digit short hash of a weights file or folder (see the module notes)."""
    path = Path(path).absolute()
    files = weight_files(path)
    key = path.as_posix() + "|" + ";".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    cache = _read_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    value = digest.hexdigest()[:10]
    cache[key] = value
    _write_cache(cache)
    return value


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdjax" / "hashes.json"


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, str]) -> None:
    file = _cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, file)
    except OSError:
        pass  # a cache that can't be written only costs time


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when absent or unreadable)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > 100 << 20:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def lora_short_hash(path: str | Path) -> str:
    """A1111's ``Lora hashes`` entry for a LoRA file: the first 12 hex digits of its ``sshs_model_hash`` metadata,
    else of kohya's "addnet" hash for .safetensors (SHA-256 of the bytes after the header), else of the file's
    SHA-256 (A1111's ``NetworkOnDisk.shorthash``)."""
    path = Path(path).absolute()
    if path.suffix.lower() != ".safetensors":
        return _sha256(path, skip_header=False)[:12]
    given = safetensors_metadata(path).get("sshs_model_hash")
    return given[:12] if given else _sha256(path, skip_header=True)[:12]


def _sha256(path: Path, *, skip_header: bool) -> str:
    stat = path.stat()
    key = f"{'addnet' if skip_header else 'sha256'}|{path.as_posix()}|{stat.st_size}:{stat.st_mtime_ns}"
    cache = _read_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while block := f.read(_BLOCK):
            digest.update(block)
    cache[key] = digest.hexdigest()
    _write_cache(cache)
    return cache[key]
