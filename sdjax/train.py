"""Training: the diffusion loss, full and LoRA fine-tuning with optax, checkpoints with orbax.

Typical use::

    pipe = sdjax.load(path)
    config = TrainConfig(learning_rate=1e-4, lora_rank=8)
    state = create_train_state(pipe, config)
    train_step = make_train_step(pipe, config)
    manager = checkpoint_manager("run/checkpoints")
    for batch in batches:        # {"pixels": (B, H, W, 3) in [0, 1], "input_ids": {"text_encoder": (B, 77)}}
        state, metrics = train_step(state, batch)
    save_checkpoint(manager, state)
    save_lora(state, "run/lora.safetensors")   # LoRA
    export_diffusers(pipe_with_trained_params(pipe, state), "run/model")   # a full fine-tune

The pieces live in ``sdjax.training``: ``loss`` (the objective), ``state`` (config, state, step), ``lora``
(factors and the saved file), ``checkpoint`` (orbax); ``export_diffusers`` is ``sdjax.checkpoint``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdjax.checkpoint import export_diffusers
from sdjax.training.checkpoint import checkpoint_manager, restore_checkpoint, save_checkpoint
from sdjax.training.lora import lora_state_dict, write_lora
from sdjax.training.loss import diffusion_loss, loss_randomness, min_snr_weights
from sdjax.training.state import (
    TrainConfig,
    TrainState,
    create_train_state,
    ema_update,
    make_optimizer,
    make_train_step,
    merged_params,
    pipe_with_trained_params,
)

__all__ = [
    "TrainConfig", "TrainState", "checkpoint_manager", "create_train_state", "diffusion_loss", "ema_update",
    "export_diffusers",
    "loss_randomness", "lora_state_dict", "make_optimizer", "make_train_step", "merged_params", "min_snr_weights",
    "pipe_with_trained_params", "restore_checkpoint", "save_checkpoint", "save_lora",
]


def save_lora(state_or_factors: TrainState | dict[str, Any], path: str | Path, *, use_ema: bool = True,
              alpha: float | None = None) -> Path:
    """Write trained LoRA factors as diffusers/PEFT safetensors (``unet.<module>.lora_A.weight`` ...), loadable by
    ``sdjax.convert.lora.apply_lora`` and diffusers' ``load_lora_weights``. From a state: its EMA factors when
    there are some and ``use_ema``, and its alpha; raw factors ({component: tree}) take ``alpha`` (None: rank)."""
    if isinstance(state_or_factors, TrainState):
        state = state_or_factors
        if not state.is_lora:
            raise ValueError("this state is a full fine-tune, not LoRA: use pipe_with_trained_params")
        use = state.ema_params if use_ema and state.ema_params is not None else state.params
        return write_lora(use, path, alpha=state.lora_alpha)
    return write_lora(state_or_factors, path, alpha=alpha)
