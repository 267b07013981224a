"""Shared machinery of the single-file layouts: renaming by module tables (both ways), prefixes, messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sdjax.convert.safe_load import CheckpointError

# Module renames: LDM module prefix -> (diffusers module prefix, renames of the keys inside it). ``None`` keeps
# the inner keys as they are (LDM's SpatialTransformer already uses diffusers' Transformer2DModel names).
Renames = Mapping[str, str] | None

def _rename_modules(
    weights: Mapping[str, Any], modules: Mapping[str, tuple[str, Renames]], what: str
) -> dict[str, Any]:
    """Rename every key by its module table entry; report unplaced keys and absent modules together."""
    out, unplaced, used = {}, [], set()
    for key, value in weights.items():
        module, inner = _find_module(key, modules)
        if module is None:
            unplaced.append(key)
            continue
        target, renames = modules[module]
        renamed = _rename_inner(inner, renames)
        if renamed is None:
            unplaced.append(key)
            continue
        out[f"{target}.{renamed}"] = value
        used.add(module)
    missing = [m for m in modules if m not in used]
    if unplaced or missing:
        problems = []
        if unplaced:
            problems.append(f"{len(unplaced)} weights have no place in it ({_preview(unplaced)})")
        if missing:
            problems.append(f"{len(missing)} of its modules are absent from the file ({_preview(missing)})")
        raise CheckpointError(f"{what} weights do not match the {what} config: " + "; ".join(problems))
    return out

def _find_module(key: str, modules: Mapping[str, Any]) -> tuple[str | None, str]:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest prefix first
        prefix = ".".join(parts[:n])
        if prefix in modules:
            return prefix, ".".join(parts[n:])
    return None, key

def _rename_inner(inner: str, renames: Renames) -> str | None:
    if renames is None:
        return inner
    for old, new in renames.items():
        if inner.startswith(old + "."):
            return new + inner[len(old) :]
    return None

def _require(config: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [key for key in keys if key not in config]
    if missing:
        raise ValueError(f"{what} config lacks {', '.join(missing)}")

def _has_prefix(state_dict: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)

def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}

def _describe_prefixes(state_dict: Mapping[str, Any]) -> str:
    """``"model.diffusion_model (686 keys), first_stage_model (248 keys)"``: enough to recognise a file."""
    counts: dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        head = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        counts[head] = counts.get(head, 0) + 1
    if not counts:
        return "an empty state dict"
    shown = sorted(counts.items(), key=lambda item: -item[1])[:8]
    more = f", and {len(counts) - len(shown)} more" if len(counts) > len(shown) else ""
    return ", ".join(f"{head} ({n} keys)" for head, n in shown) + more

def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

def _invert_modules(
    state: Mapping[str, Any], modules: Mapping[str, tuple[str, Renames]], what: str
) -> dict[str, Any]:
    """The inverse of :func:`_rename_modules`: diffusers keys back to the original layout's, by the same table."""
    inverse = {target: (module, renames) for module, (target, renames) in modules.items()}
    out, unplaced = {}, []
    for key, value in state.items():
        target, inner = _find_module(key, inverse)
        if target is None:
            unplaced.append(key)
            continue
        module, renames = inverse[target]
        if renames is not None:
            back = {new: old for old, new in renames.items()}
            renamed = _rename_inner(inner, back)
            if renamed is None:
                unplaced.append(key)
                continue
            inner = renamed
        out[f"{module}.{inner}"] = value
    if unplaced:
        raise CheckpointError(f"{what}: {len(unplaced)} weights have no place in the single-file layout "
                              f"({_preview(unplaced)})")
    return out
