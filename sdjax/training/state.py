"""Train state, optimiser and the jitted, data-parallel train step (full fine-tuning or LoRA)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sdjax.models.vae import sample_latent, scale_latents
from sdjax.parallel import DATA, batch_sharded, data_mesh, replicated
from sdjax.text import encode_modules
from sdjax.training import lora
from sdjax.training.loss import diffusion_loss

# Stream of the LoRA init key: fold_in(PRNGKey(seed), _INIT_STREAM). Steps use fold_in(PRNGKey(seed), step), so
# the init draw is a step number no run reaches.
_INIT_STREAM = 2**32 - 1
_TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. ``lora_rank`` None: full fine-tune (UNet, plus the text encoders when
    ``train_text_encoder``); otherwise only LoRA factors on ``lora_targets`` (UNet) and ``lora_text_targets``
    (text encoders, when ``train_text_encoder``) are trained, with scale ``lora_alpha / lora_rank`` (alpha None:
    alpha = rank)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    train_text_encoder: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_text_targets: tuple[str, ...] = _TEXT_LORA_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer or None, got {self.lora_rank}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def lora_scale(self) -> float:
        assert self.lora_rank is not None
        return (self.lora_rank if self.lora_alpha is None else self.lora_alpha) / self.lora_rank


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue exactly: a pytree (orbax saves it whole).

    ``params``: the trained arrays, by component: full params (float32 master copy) or LoRA factors.
    ``ema_params``: their exponential moving average, or None. ``key``: the run's base key PRNGKey(seed); step s
    draws from ``fold_in(key, s)``. ``lora_alpha`` (static): None for a full fine-tune, else the LoRA alpha.
    """

    step: jax.Array
    params: dict[str, Any]
    opt_state: Any
    ema_params: dict[str, Any] | None
    key: jax.Array
    lora_alpha: float | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def is_lora(self) -> bool:
        return self.lora_alpha is not None


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    lr: Any = config.learning_rate
    if config.warmup_steps:
        lr = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    adamw = optax.adamw(lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def trained_components(pipe: Any, config: TrainConfig) -> list[str]:
    return ["unet"] + (sorted(pipe.text_encoders) if config.train_text_encoder else [])


def create_train_state(pipe: Any, config: TrainConfig, *, mesh: Mesh | None = None) -> TrainState:
    """The state at step 0, replicated over ``mesh`` (default: all devices)."""
    rep = replicated(mesh or data_mesh())
    components = trained_components(pipe, config)
    if config.lora_rank is None:
        # Casting on the host keeps this free of per-shape eager compiles; float32 is the master copy.
        params = jax.device_put({c: jax.tree.map(lambda x: np.asarray(x, np.float32), pipe.params[c])
                                 for c in components}, rep)
    else:
        layout = []
        for c in components:
            names = config.lora_targets if c == "unet" else config.lora_text_targets
            modules = lora.target_modules(pipe.params[c], names)
            if not modules:
                raise ValueError(f"no {c} modules match the LoRA targets {names}")
            layout.append((c, lora.module_shapes(pipe.params[c], modules)))
        init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _INIT_STREAM)
        params = jax.device_put(_init_lora(init_key, tuple(layout), config.lora_rank), rep)
    opt_state, ema = jax.device_put(_init_optimizer(params, config), rep)
    return TrainState(
        step=jax.device_put(np.int32(0), rep),
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        key=jax.device_put(np.asarray(jax.random.PRNGKey(config.seed)), rep),
        lora_alpha=None if config.lora_rank is None else float(config.lora_rank * config.lora_scale),
    )


# Module-level jits with static layouts: compiled once per model and config, not once per call.
@functools.partial(jax.jit, static_argnames=("layout", "rank"))
def _init_lora(key: jax.Array, layout: tuple, rank: int) -> dict[str, Any]:
    return {c: lora.init_factors(shapes, rank, jax.random.fold_in(key, i)) for i, (c, shapes) in enumerate(layout)}


@functools.partial(jax.jit, static_argnames=("config",))
def _init_optimizer(params: dict[str, Any], config: TrainConfig) -> tuple[Any, Any]:
    # The EMA starts as a real copy: a forwarded input would alias params, and the step donates both.
    ema = None if config.ema_decay is None else jax.tree.map(jnp.copy, params)
    return make_optimizer(config).init(params), ema


def model_params(frozen: Mapping[str, Any], trained: Mapping[str, Any], lora_scale: float | None) -> dict[str, Any]:
    """All components' params for the forward pass: frozen ones, trained ones, or frozen + merged LoRA factors."""
    if lora_scale is None:
        return {**frozen, **trained}
    return {**frozen, **{c: lora.merge(frozen[c], f, lora_scale) for c, f in trained.items()}}


def _default_time_ids(pipe: Any, height: int, width: int, batch: int) -> jax.Array:
    # SDXL size conditioning for uncropped training images at their own size (refiner: plus an aesthetic score).
    ids = (height, width, 0, 0, 6.0) if pipe.requires_aesthetics_score else (height, width, 0, 0, height, width)
    return jnp.tile(jnp.asarray(ids, jnp.float32), (batch, 1))


def make_train_step(
    pipe: Any, config: TrainConfig, *, mesh: Mesh | None = None
) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``train_step(state, batch) -> (state, metrics)``.

    ``batch``: ``"pixels"`` (B, H, W, 3) in [0, 1] (VAE-encoded in the step, a posterior sample drawn with the
    step's key) or ``"latents"`` (B, h, w, C) already scaled; ``"input_ids"``: {encoder name: (B, 77) ids};
    SDXL optionally ``"time_ids"`` (B, 6) (default: the image's size, no crop). The batch is sharded over the
    mesh's "data" axis (B must divide evenly), params are replicated; the input state is donated.
    """
    mesh = mesh or data_mesh()
    components = trained_components(pipe, config)
    lora_scale = None if config.lora_rank is None else config.lora_scale
    # Full fine-tune: trained components live only in the state. LoRA: the base weights are frozen inputs.
    frozen = {c: p for c, p in pipe.params.items() if lora_scale is not None or c not in components}
    frozen = jax.device_put(frozen, replicated(mesh))
    optimizer = make_optimizer(config)
    encoders = [(name, pipe.text_encoders[name].module) for name in sorted(pipe.text_encoders)]
    train_text = config.train_text_encoder

    def step(state: TrainState, frozen: dict[str, Any], batch: dict[str, Any]) -> tuple[TrainState, dict]:
        vae_key, loss_key = jax.random.split(jax.random.fold_in(state.key, state.step))
        if "latents" in batch:
            latents = batch["latents"].astype(jnp.float32)
        else:
            images = batch["pixels"].astype(jnp.float32) * 2.0 - 1.0
            mean, logvar = pipe.vae.apply({"params": frozen["vae"]}, images, method="encode")
            latents = scale_latents(sample_latent(mean, logvar, vae_key), pipe.vae.config)

        def condition(params: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array] | None]:
            context, pooled = encode_modules(pipe.is_sdxl, encoders, params, batch["input_ids"], None)
            if not pipe.is_sdxl:
                return context, None
            f = pipe.vae_scale_factor
            time_ids = batch.get("time_ids")
            if time_ids is None:
                time_ids = _default_time_ids(pipe, latents.shape[1] * f, latents.shape[2] * f, latents.shape[0])
            return context, {"text_embeds": pooled, "time_ids": time_ids}

        fixed = None if train_text else condition(frozen)  # frozen text encoders: outside the gradient

        def loss_fn(trained: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
            params = model_params(frozen, trained, lora_scale)
            context, added = condition(params) if fixed is None else fixed
            return diffusion_loss(pipe.unet, params["unet"], latents, context, loss_key, pipe.scheduler,
                                  added_cond=added, min_snr_gamma=config.min_snr_gamma,
                                  offset_noise=config.offset_noise)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, config.ema_decay)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    jitted = jax.jit(step, in_shardings=(replicated(mesh), replicated(mesh), batch_sharded(mesh)),
                     out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=(0,))
    devices = mesh.shape[DATA]

    def train_step(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        if state.is_lora != (lora_scale is not None):
            raise ValueError("the state and the train step disagree on LoRA vs full fine-tuning")
        size = len(batch["latents" if "latents" in batch else "pixels"])
        if size % devices:
            raise ValueError(f"batch size {size} is not a multiple of the {devices} devices of the mesh")
        missing = sorted(set(pipe.text_encoders) - set(batch["input_ids"]))
        if missing:
            raise ValueError(f"batch['input_ids'] lacks token ids for {', '.join(missing)}")
        # Pin every input to the step's shardings: a host array (e.g. a replaced step counter) or a batch laid
        # out differently would otherwise count as a new input type and recompile the step.
        state = jax.device_put(state, replicated(mesh))
        return jitted(state, frozen, jax.device_put(dict(batch), batch_sharded(mesh)))

    return train_step


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def merged_params(pipe: Any, state: TrainState, *, use_ema: bool = True) -> dict[str, Any]:
    """The pipeline's params with the training result in (LoRA merged, or full params replaced; the EMA copy
    when there is one and ``use_ema``), as host numpy arrays in the pipeline's own dtypes: ready for generation."""
    trained = state.ema_params if use_ema and state.ema_params is not None else state.params
    params = dict(pipe.params)
    for component, tree in trained.items():
        base = pipe.params[component]
        if state.is_lora:
            rank = lora.lora_rank(tree)
            new = lora.merge(base, tree, state.lora_alpha / rank, keep_float32=False)
        else:
            new = jax.tree.map(lambda new, old: jnp.asarray(new).astype(np.asarray(old).dtype), tree, base)
        params[component] = jax.tree.map(np.asarray, jax.device_get(new))
    return params


def pipe_with_trained_params(pipe: Any, state: TrainState, *, use_ema: bool = True) -> Any:
    """A Pipeline that generates with the trained weights (see :func:`merged_params`)."""
    return pipe.replace(params=merged_params(pipe, state, use_ema=use_ema))
