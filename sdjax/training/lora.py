"""LoRA factors for training: which modules, initialisation, the merged forward weights, and the saved file.

Factors mirror the Flax params tree: ``factors[component][...module path...] = {"lora_A": (rank, in),
"lora_B": (out, rank)}`` in PyTorch orientation, so saving is a rename and ``B @ A`` is the PyTorch ``(out, in)``
weight change. The forward pass uses ``W + scale * (B @ A).T`` (Flax Dense kernels are ``(in, out)``) with
``scale = alpha / rank``, built functionally from frozen base params: nothing is merged in place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.weights import flatten, torch_key_to_path, torch_module_name, unflatten

Path_ = tuple[str, ...]

# PEFT-layout key prefixes per component, as diffusers' save_lora_weights writes them.
_KEY_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder.text_model.",
               "text_encoder_2": "text_encoder_2.text_model."}


def target_modules(params: Mapping[str, Any], targets: Sequence[str]) -> list[Path_]:
    """Flax paths of the Dense layers whose PyTorch module name ends with one of ``targets`` (e.g. ``"to_q"``,
    ``"to_out.0"``, ``"attn1.to_k"``)."""
    wanted = [torch_key_to_path(t) for t in targets]
    found = []
    for path, value in flatten(params).items():
        module = path[:-1]
        if path[-1] != "kernel" or not any(module[-len(w):] == w for w in wanted):
            continue
        if np.ndim(value) != 2:
            raise ValueError(f"LoRA target {'/'.join(module)} is not a linear layer (kernel shape "
                             f"{np.shape(value)}); sdjax trains LoRA on linear layers only")
        found.append(module)
    return sorted(found)


def module_shapes(params: Mapping[str, Any], modules: Sequence[Path_]) -> tuple[tuple[Path_, int, int], ...]:
    """``(path, in, out)`` of each module's kernel: hashable, so it can be a static jit argument."""
    flat = flatten(params)
    return tuple((m, *(int(d) for d in np.shape(flat[m + ("kernel",)]))) for m in modules)


def init_factors(shapes: Sequence[tuple[Path_, int, int]], rank: int, key: jax.Array) -> dict[str, Any]:
    """Factors for one component's modules (see :func:`module_shapes`): A ~ N(0, 1/rank^2) (PEFT's "gaussian"
    init), B = 0, so training starts from the base model exactly. float32 whatever the params' dtype (they are
    the trained master copy)."""
    factors: dict[Path_, Any] = {}
    for i, (module, d_in, d_out) in enumerate(shapes):
        factors[module + ("lora_A",)] = jax.random.normal(jax.random.fold_in(key, i), (rank, d_in), jnp.float32) / rank
        factors[module + ("lora_B",)] = jnp.zeros((d_out, rank), jnp.float32)
    return unflatten(factors)


def lora_rank(factors: Mapping[str, Any]) -> int:
    ranks = {int(np.shape(v)[0]) for p, v in flatten(factors).items() if p[-1] == "lora_A"}
    if len(ranks) != 1:
        raise ValueError(f"LoRA factors have ranks {sorted(ranks)}; expected exactly one")
    return ranks.pop()


def merge(params: Mapping[str, Any], factors: Mapping[str, Any], scale: float, *, keep_float32: bool = True) -> Any:
    """``params`` with ``kernel + scale * (B @ A).T`` at every factored module. Traceable (used inside the loss).

    ``keep_float32``: merged kernels stay float32 (a small update would round away in a bf16 kernel); False casts
    them back to the base kernel's dtype (for generation)."""
    flat, flat_factors = flatten(params), flatten(factors)
    for path, a in flat_factors.items():
        if path[-1] != "lora_A":
            continue
        module = path[:-1]
        kernel = flat[module + ("kernel",)]
        b = flat_factors[module + ("lora_B",)]
        delta = scale * (a.T @ b.T)  # (in, rank) @ (rank, out): the (in, out) Flax layout
        merged = jnp.asarray(kernel, jnp.float32) + delta
        flat[module + ("kernel",)] = merged if keep_float32 else merged.astype(jnp.asarray(kernel).dtype)
    return unflatten(flat)


def lora_state_dict(factors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """diffusers/PEFT keys (``unet.<module>.lora_A.weight`` (rank, in), ``.lora_B.weight`` (out, rank)) -> float32
    numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for component, tree in factors.items():
        if component not in _KEY_PREFIX:
            raise ValueError(f"no LoRA key layout for component {component!r}")
        for path, value in flatten(tree).items():
            key = f"{_KEY_PREFIX[component]}{torch_module_name(path[:-1])}.{path[-1]}.weight"
            out[key] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


def write_lora(factors: Mapping[str, Any], path: str | Path, *, alpha: float | None = None,
               targets: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Save factors as diffusers/PEFT safetensors. The scale goes in diffusers' ``lora_adapter_metadata`` header
    (PEFT ``LoraConfig`` fields per component), which both diffusers and sdjax's loader read; ``alpha`` None means
    alpha = rank (scale 1)."""
    from safetensors.numpy import save_file

    state_dict = lora_state_dict(factors)
    rank = lora_rank(factors)
    alpha = float(rank if alpha is None else alpha)
    metadata: dict[str, Any] = {}
    for component, tree in factors.items():
        names = sorted({torch_module_name(p[:-1]) for p in flatten(tree)})
        config = dict(r=rank, lora_alpha=alpha, target_modules=list((targets or {}).get(component) or names),
                      init_lora_weights="gaussian", lora_dropout=0.0, bias="none", use_rslora=False,
                      use_dora=False)
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata,
                                                                                                   sort_keys=True)})
    return path
