"""Orbax checkpoints of the whole TrainState (params, optimiser state, EMA, step, key): a resumed run continues
bit-for-bit, because every step's randomness is derived from (key, step)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sdjax.training.state import TrainState


def checkpoint_manager(directory: str | Path, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """A manager for ``directory`` (created if needed) keeping the newest ``max_to_keep`` checkpoints."""
    directory = Path(directory).absolute()  # orbax wants an absolute path
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, *, wait: bool = True) -> int:
    """Save ``state`` under its step number; returns the step. ``wait=False`` lets orbax finish writing in the
    background (call ``manager.wait_until_finished()`` before exiting)."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():  # the same step of a deterministic run: the same state
        return step
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if wait:
        manager.wait_until_finished()
    return step


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState, *, step: int | None = None) -> TrainState:
    """The saved state at ``step`` (default: the latest), with the template's structure, dtypes and shardings
    (build the template with ``create_train_state`` for the same pipeline and config)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
