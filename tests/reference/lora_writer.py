"""Tiny LoRA and textual-inversion files for tests, in the layouts real tools write.

- kohya / A1111 LoRA: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (random numbers).
- diffusers / PEFT LoRA: made by PEFT itself on a tiny diffusers pipeline and written by the pipeline's
  ``save_lora_weights`` (with the ``lora_adapter_metadata`` header), exactly as diffusers' training scripts do.
- diffusers LoRA in older layouts (``.lora.down.weight``, attention-processor ``to_q_lora.down.weight``).
- textual inversion: A1111 ``.pt`` (``string_to_param``), A1111 ``.safetensors`` (``emb_params``), diffusers'
  ``learned_embeds.safetensors`` (``{token: vectors}``) and SDXL pairs (``clip_l`` / ``clip_g``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

Shape = tuple[int, ...]


def lora_pair(weight_shape: Shape, rank: int, rng: np.random.Generator, std: float = 0.1) -> tuple[np.ndarray, ...]:
    """(down, up) for a PyTorch weight of ``weight_shape``: Linear (out, in) or Conv (out, in, kh, kw); a conv
    gets a kxk down and a 1x1 up (LoCon)."""
    out_dim, in_dim = weight_shape[:2]
    kernel = tuple(weight_shape[2:])
    down = rng.normal(0.0, std, (rank, in_dim) + kernel).astype(np.float32)
    up = rng.normal(0.0, std, (out_dim, rank) + (1,) * len(kernel)).astype(np.float32)
    return down, up


def kohya_lora(
    targets: Mapping[str, Shape], *, rank: int, alpha: float | None, seed: int
) -> dict[str, np.ndarray]:
    """A kohya-format LoRA: ``targets`` maps kohya module names (``lora_unet_...``, ``lora_te_...``) to the
    PyTorch weight shapes they change."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in targets.items():
        down, up = lora_pair(shape, rank, rng)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


def kohya_to_diffusers_old(kohya: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The same LoRA in older diffusers naming (``unet.<module>.lora.down.weight``, ``.alpha``); ``names`` maps
    each kohya module name to ``component.module.path``."""
    out: dict[str, np.ndarray] = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        new_suffix = {"lora_down.weight": "lora.down.weight", "lora_up.weight": "lora.up.weight"}.get(suffix, suffix)
        out[f"{names[module]}.{new_suffix}"] = value
    return out


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path), metadata=metadata)
    return path


def peft_lora(
    pipe: Any,
    folder: Path,
    targets: Mapping[str, Sequence[str]],
    *,
    rank: int,
    alpha: float,
    seed: int,
    alpha_pattern: Mapping[str, float] | None = None,
) -> Path:
    """Add a PEFT LoRA to ``pipe``'s components (``targets``: component -> target module names), fill it with
    random numbers and write it with the pipeline's ``save_lora_weights``. Returns the file. ``pipe`` keeps the
    adapter layers: pass a scratch pipeline."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, Any] = {}
    for component, modules in targets.items():
        model = getattr(pipe, component)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), init_lora_weights=False,
                            alpha_pattern=dict(alpha_pattern or {}))
        # PEFT itself, as diffusers' add_adapter does (transformers' add_adapter wants a newer PEFT).
        inject_adapter_in_model(config, model, adapter_name="writer")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="writer")
        layers[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


# --- textual inversion -------------------------------------------------------------------------------------------


def a1111_pt(path: Path, name: str, vectors: np.ndarray) -> Path:
    """An A1111 ``.pt`` embedding as its trainer saves it."""
    import torch

    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.from_numpy(np.asarray(vectors, np.float32))},
        "name": name,
        "step": 1000,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def a1111_safetensors(path: Path, vectors: np.ndarray) -> Path:
    return save_safetensors({"emb_params": np.asarray(vectors, np.float32)}, path)


def diffusers_embeds(path: Path, token: str, vectors: np.ndarray) -> Path:
    """diffusers' ``learned_embeds.safetensors``: ``{token: vectors}``."""
    return save_safetensors({token: np.asarray(vectors, np.float32)}, path)


def sdxl_pair(path: Path, clip_l: np.ndarray, clip_g: np.ndarray) -> Path:
    return save_safetensors({"clip_l": np.asarray(clip_l, np.float32), "clip_g": np.asarray(clip_g, np.float32)},
                            path)
