"""What one sampler step sees, and the per-image noise it draws."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdjax.samplers.denoiser import StepDenoiser
from sdjax.samplers.schedules import Schedule

State = Any  # a sampler's carry besides x: a pytree of fixed-shape arrays (history for multistep samplers)


class Step(NamedTuple):
    """Arguments of a sampler step ``step(s, x, state) -> (x, state)``.

    ``i``: index into the schedule (traced int32). ``n``: steps already taken in this call (0 on the first;
    multistep samplers warm up from it, as diffusers' counters do after ``set_begin_index``).
    ``sched``: the schedule, arrays as jax arrays. ``eta``: float32 scalar (stochastic samplers).
    ``noise(j)``: the j-th standard-normal draw of this step, shaped like x; None when no keys were given.
    ``post(x)``: the caller's per-step hook (e.g. inpainting's blend) at this step; second-order samplers apply
    it to their intermediate latents before the second evaluation too, as diffusers' pipelines do after every
    scheduler call.
    """

    i: jax.Array
    n: jax.Array
    sched: Schedule
    denoise: StepDenoiser
    eta: jax.Array
    noise: Callable[[int], jax.Array] | None
    post: Callable[[jax.Array], jax.Array] = lambda x: x

    @property
    def is_last(self) -> jax.Array:
        return self.i == self.sched.num_steps - 1

    def draw(self, j: int) -> jax.Array:
        if self.noise is None:
            raise ValueError(f"sampler {self.sched.sampler!r} is stochastic here: pass keys= (one key per image)")
        return self.noise(j)


def check_keys(keys: jax.Array, batch: int) -> jax.Array:
    """Per-image keys: shape (B,) typed keys or (B, 2) uint32 raw keys."""
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        ok = keys.shape == (batch,)
    else:
        ok = keys.dtype == jnp.uint32 and keys.shape == (batch, 2)
    if not ok:
        raise ValueError(f"keys must be one key per image: shape ({batch},) typed keys or ({batch}, 2) uint32, "
                         f"got shape {keys.shape} dtype {keys.dtype}")
    return keys


def image_normal(keys: jax.Array, shape: tuple[int, ...], *folds: jax.Array | int) -> jax.Array:
    """Standard normals of shape (B, *shape): image b's draw is ``normal(fold_in(...fold_in(key_b, f)...))``.

    A function of the image's own key and ``folds`` only, so an image never depends on batch size, its
    position in the batch or the device count.
    """

    def one(key: jax.Array) -> jax.Array:
        for f in folds:
            key = jax.random.fold_in(key, f)
        return jax.random.normal(key, shape, jnp.float32)

    return jax.vmap(one)(keys)
