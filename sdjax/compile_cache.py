"""Warm starts: JAX's persistent compilation cache plus serialized executables, in one folder.

JAX's persistent cache stores XLA's compiled code, but a new process still traces and lowers every function
before it can look the code up (about half of the cold compile phase for the default model). So each jitted
generation is also stored whole: ``jit(f).lower(*args).compile()`` serialized with
``jax.experimental.serialize_executable``, keyed by everything that fixes the executable (the static model and
plan, the argument tree's structure, shapes, dtypes and shardings, the jax version, backend, devices and XLA
flags). A hit deserializes it and skips tracing entirely.

``enable()`` is what the CLI and batch jobs call; the library alone leaves caching off. Folder:
``$SDJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdjax/jax``, else ``~/.cache/sdjax/jax``; ``SDJAX_NO_CACHE=1``
turns it off. Executables go to ``<folder>/executables``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import jax

_state: dict[str, Any] = {"dir": None}
_loaded: dict[str, Any] = {}  # key -> compiled executable, this process
# This process's executable lookups: hits, misses, and the seconds hits took to read and load (a compile clock
# made of JAX's compile events should add LOAD_EVENT's durations: on a hit JAX traces and compiles nothing).
stats: dict[str, float] = {"load_seconds": 0.0, "hits": 0, "misses": 0}
LOAD_EVENT = "/sdjax/compile/executable_cache_duration"
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_jax_cache_hits = [0]  # JAX's persistent-cache hits in this process, counted by _count_hit


def _count_hit(event: str, **_: Any) -> None:
    if event == _JAX_CACHE_HIT:
        _jax_cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_hit)


def default_dir() -> Path:
    if os.environ.get("SDJAX_CACHE_DIR"):
        return Path(os.environ["SDJAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sdjax" / "jax"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on both caches in ``path`` (default :func:`default_dir`); returns the folder, or None when
    ``SDJAX_NO_CACHE=1``. Call it before the first compile: JAX fixes its cache folder at its first use."""
    if os.environ.get("SDJAX_NO_CACHE", "").strip() not in ("", "0"):
        return None
    folder = Path(path).expanduser() if path is not None else default_dir()
    (folder / "executables").mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Write every entry: the small ones (the decoder, helpers) cost a cold process compile time too.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _state["dir"] = folder
    return folder


def disable() -> None:
    """Stop using the executable store (JAX's own cache folder stays as configured)."""
    _state["dir"] = None
    _loaded.clear()


def directory() -> Path | None:
    return _state["dir"]


def _describe(x: Any) -> str:
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "mesh"):
        mesh = sharding.mesh
        where = f"{dict(mesh.shape)}:{[d.id for d in mesh.devices.flat]}:{sharding.spec}"
    elif sharding is not None:
        where = f"{type(sharding).__name__}:{sorted(d.id for d in sharding.device_set)}"
    else:
        where = "host"
    return f"{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x).__name__)}:{where}"


# jax settings that change the compiled code without changing the arguments.
_CONFIG_KEYS = ("jax_disable_most_optimizations", "jax_enable_x64", "jax_default_matmul_precision",
                "jax_numpy_rank_promotion", "jax_threefry_partitionable")


def key_of(name: str, static: Hashable, args: tuple) -> str:
    """A stable digest of what fixes the executable. ``static``'s repr must be deterministic (frozen
    dataclasses of configs and Flax modules are)."""
    leaves, tree = jax.tree.flatten(args)
    devices = jax.devices()
    parts = [
        name, repr(static), str(tree), ";".join(_describe(x) for x in leaves),
        jax.__version__, jax.default_backend(), devices[0].device_kind, str(len(devices)), str(jax.process_count()),
        os.environ.get("XLA_FLAGS", ""), *(f"{k}={jax.config.values.get(k)}" for k in _CONFIG_KEYS),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def compiled(name: str, static: Hashable, jitted: Callable, args: tuple) -> Callable:
    """``jitted`` compiled for ``args``: from this process's memory, the folder's serialized executables, or
    traced and compiled now (and stored). Without :func:`enable`, ``jitted`` itself."""
    folder = directory()
    if folder is None or jax.process_count() > 1:
        # Several processes: an executable is tied to the global device set, and deserializing one made with
        # another layout aborts inside XLA; JAX's own persistent cache still applies there.
        return jitted
    key = key_of(name, static, args)
    if key in _loaded:
        return _loaded[key]
    start = time.perf_counter()
    path = folder / "executables" / f"{name}-{key}.bin"
    fn = _load(path, args)
    if fn is None:
        stats["misses"] += 1
        hits = _jax_cache_hits[0]
        fn = jitted.lower(*args).compile()  # JAX reports this time itself (its compile events)
        # An executable JAX read back from its own cache serializes incompletely on CPU (the reloaded copy
        # fails at its first run: "Function ..._fusion not found"), so only fresh compiles are stored.
        if _jax_cache_hits[0] == hits:
            _store(path, fn)
    else:
        stats["hits"] += 1
        seconds = time.perf_counter() - start
        stats["load_seconds"] += seconds
        jax.monitoring.record_event_duration_secs(LOAD_EVENT, seconds)
    _loaded[key] = fn
    return fn


def _load(path: Path, args: tuple) -> Any:
    from jax.experimental import serialize_executable as se

    try:
        payload, out_tree = pickle.loads(path.read_bytes())  # our own file, written by _store below
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
        return None
    in_tree = jax.tree.structure((args, {}))
    try:
        return se.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # noqa: BLE001 (a stale or foreign entry: compile afresh and overwrite it)
        return None


def _store(path: Path, fn: Any) -> None:
    from jax.experimental import serialize_executable as se

    try:
        payload, _, out_tree = se.serialize(fn)
        data = pickle.dumps((payload, out_tree))
    except Exception:  # noqa: BLE001 (e.g. an executable with host callbacks: it simply isn't stored)
        return
    # Atomic: a process killed mid-write leaves no half entry, and concurrent writers don't mix.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
