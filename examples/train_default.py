"""Train sdjax's small default model from scratch on synthetic shapes, and save it as a diffusers folder.

    python examples/train_default.py                       # the shipped model: ~28 min on 2 (shared) CPU cores
    python examples/train_default.py --out /tmp/m --tiny --steps-vae 2 --steps-unet 2 --images 64   # smoke run

The model has Stable Diffusion's classes and layout at 64x64 pixels: an AutoencoderKL (downsample factor 8,
4 latent channels), a CLIP text encoder (the real CLIP tokenizer and its 49408-token vocabulary, 64 wide) and a
UNet2DConditionModel (8x8 latents, cross-attention on the text states), with an SD-style scaled-linear noise
schedule and epsilon prediction. It learns captions like "a red circle on a blue background"
(``sdjax.data.shapes``).

Training, all with one fixed seed:

1. the VAE: L1 + L2 reconstruction through a posterior sample, plus a small KL term (no GAN, no LPIPS);
2. the latent scaling factor: 1 / std of the posterior samples of the training images, as SD's was chosen;
3. the UNet and the text encoder jointly, from scratch, with ``sdjax.train.diffusion_loss`` (min-SNR-5
   weighting); the caption is dropped to "" 10% of the time so classifier-free guidance works. An EMA of the
   weights is what gets saved.

The folder (``model_index.json`` as StableDiffusionPipeline, fp16 safetensors, an EulerDiscreteScheduler
config, the CLIP tokenizer files) loads with ``sdjax.load(folder)`` and diffusers'
``StableDiffusionPipeline.from_pretrained(folder)``. ``training_log.json`` records seed, wall time, step
counts and losses.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sdjax  # noqa: F401  (applies sdjax's XLA flags before JAX starts)
from sdjax import checkpoint
from sdjax.data import shapes
from sdjax.loaders import DEFAULT_MODEL
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig, sample_latent
from sdjax.samplers.schedules import SchedulerConfig
from sdjax.text import encode_modules
from sdjax.tokenizer import SHIPPED_DIR, load_tokenizer, tokenize
from sdjax.train import diffusion_loss

DIFFUSERS_VERSION = "0.42.1"

# --- configs (diffusers / transformers config.json contents) ----------------------------------------------------

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    # "trailing" (and Euler's "linspace") start sampling at t=999, the noise level pure noise matches: with the
    # few steps a small model is sampled with, "leading" would start at a visibly lower noise level.
    "timestep_spacing": "trailing",
    "steps_offset": 1,  # only "leading" spacing reads it; SD 1.x's value, for anyone who switches
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
    # Read when the same file configures DDIM / DDPM / PNDM (SD 1.x's values); Euler ignores them.
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def vae_config(tiny: bool) -> dict[str, Any]:
    channels = [8, 8, 8] if tiny else [16, 32, 64, 64]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        # Few groups: with one channel per group, GroupNorm would erase each channel's mean, i.e. flat colour.
        "norm_num_groups": 4,
        "sample_size": shapes.IMAGE_SIZE,
        "scaling_factor": 1.0,  # replaced by the measured value
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def text_encoder_config(tiny: bool) -> dict[str, Any]:
    hidden = 32 if tiny else 64
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,  # the real CLIP tokenizer
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": 1 if tiny else 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",  # the weights are stored in float16; compute in float32
    }


def unet_config(tiny: bool, latent_size: int, cross_attention_dim: int) -> dict[str, Any]:
    channels = [32] if tiny else [64, 96, 96]
    down = ["CrossAttnDownBlock2D"] * max(1, len(channels) - 1) + ["DownBlock2D"] * (len(channels) > 1)
    up = ["UpBlock2D"] * (len(channels) > 1) + ["CrossAttnUpBlock2D"] * max(1, len(channels) - 1)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": 1,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 16 if tiny else 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,  # diffusers reads this as the number of heads
        "use_linear_projection": True,
        "upcast_attention": False,
    }


MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# --- helpers ---------------------------------------------------------------------------------------------------


def count(params: Any) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def adam(lr: float, steps: int, warmup: int) -> optax.GradientTransformation:
    warmup = max(1, min(warmup, steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=0.0))


def run_steps(name: str, step: Callable, state: Any, steps: int, key: jax.Array, log_every: int) -> tuple[Any, dict]:
    """Run ``state, metrics = step(state, key_i)`` ``steps`` times; print progress; return the state and a log."""
    t0 = time.time()
    history: list[float] = []
    compile_s = 0.0
    for i in range(steps):
        state, metrics = step(state, jax.random.fold_in(key, i))
        if i == 0:
            jax.block_until_ready(metrics)
            compile_s = time.time() - t0
        if i % log_every == 0 or i == steps - 1:
            loss = float(metrics["loss"])
            history.append(loss)
            rate = (time.time() - t0 - compile_s) / max(i, 1)
            extra = "  ".join(f"{k} {float(v):.4f}" for k, v in metrics.items() if k != "loss")
            print(f"[{name}] step {i:5d}/{steps}  loss {loss:.4f}  {extra}  ({time.time() - t0:.0f}s, "
                  f"{rate:.2f}s/step)", flush=True)
    jax.block_until_ready(state)
    last = float(metrics["loss"])
    return state, {"steps": steps, "wall_time_s": round(time.time() - t0, 1), "first_step_s": round(compile_s, 1),
                   "final_loss": last, "loss_every": log_every, "loss_history": [round(h, 5) for h in history]}


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


# --- 1. the VAE ----------------------------------------------------------------------------------------------------


def train_vae(config: VAEConfig, images: np.ndarray, args: argparse.Namespace, key: jax.Array) -> tuple[Any, dict]:
    vae = AutoencoderKL(config)
    init_key, train_key = jax.random.split(key)
    params = jax.jit(vae.init)(init_key, jnp.zeros((1, 64, 64, 3)))["params"]
    opt = adam(args.lr_vae, args.steps_vae, 50)
    data = jnp.asarray(images)

    def loss_fn(params, x, key):
        mean, logvar = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        z = sample_latent(mean, logvar, key)
        recon = vae.apply({"params": params}, z, method=AutoencoderKL.decode)
        l1 = jnp.mean(jnp.abs(recon - x))
        l2 = jnp.mean((recon - x) ** 2)
        kl = jnp.mean(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
        return l1 + l2 + args.kl_weight * kl, {"l1": l1, "kl": kl}

    @jax.jit
    def step(state, key):
        params, opt_state = state
        k_idx, k_z = jax.random.split(key)
        x = data[jax.random.randint(k_idx, (args.batch_vae,), 0, data.shape[0])] * 2.0 - 1.0
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, k_z)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, **aux}

    (params, _), log = run_steps("vae", step, (params, opt.init(params)), args.steps_vae, train_key, args.log_every)
    log.update(batch_size=args.batch_vae, learning_rate=args.lr_vae, kl_weight=args.kl_weight, params=count(params))
    return params, log


def encode_all(config: VAEConfig, params: Any, images: np.ndarray, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    vae = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0, method=AutoencoderKL.encode))
    means, logvars = [], []
    for i in range(0, len(images), batch):
        m, lv = encode(params, jnp.asarray(images[i:i + batch]))
        means.append(np.asarray(m))
        logvars.append(np.asarray(lv))
    return np.concatenate(means), np.concatenate(logvars)


def reconstruction_error(config: VAEConfig, params: Any, images: np.ndarray) -> float:
    vae = AutoencoderKL(config)
    recon = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0) / 2.0 + 0.5)(params, jnp.asarray(images))
    return float(jnp.mean(jnp.abs(jnp.clip(recon, 0, 1) - images)))


# --- 3. UNet + text encoder ---------------------------------------------------------------------------------------


def train_unet(unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, scheduler: SchedulerConfig, means: np.ndarray,
               logvars: np.ndarray, scale: float, ids: np.ndarray, empty_ids: np.ndarray,
               args: argparse.Namespace, key: jax.Array) -> tuple[dict, dict]:
    unet = UNet2DConditionModel(unet_cfg)
    text_model = CLIPTextModel(text_cfg)
    k_unet, k_text, train_key = jax.random.split(key, 3)
    n, h, w, c = means.shape
    params = {
        "unet": jax.jit(unet.init)(k_unet, jnp.zeros((1, h, w, c)), jnp.zeros((1,)),
                                   jnp.zeros((1, 77, text_cfg.hidden_size)))["params"],
        "text_encoder": jax.jit(text_model.init)(k_text, jnp.zeros((1, 77), jnp.int32))["params"],
    }
    opt = adam(args.lr_unet, args.steps_unet, 100)
    data = {"mean": jnp.asarray(means), "logvar": jnp.asarray(logvars), "ids": jnp.asarray(ids)}
    empty = jnp.asarray(empty_ids)[None]
    encoders = (("text_encoder", text_model),)

    def loss_fn(params, latents, token_ids, key):
        context, _ = encode_modules(False, encoders, params, {"text_encoder": token_ids}, None)
        return diffusion_loss(unet, params["unet"], latents, context, key, scheduler,
                              min_snr_gamma=args.min_snr_gamma)

    @jax.jit
    def step(state, key):
        params, ema, opt_state, i = state
        k_idx, k_z, k_drop, k_loss = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (args.batch_unet,), 0, n)
        latents = scale * sample_latent(data["mean"][idx], data["logvar"][idx], k_z)
        drop = jax.random.uniform(k_drop, (args.batch_unet, 1)) < args.caption_dropout
        token_ids = jnp.where(drop, empty, data["ids"][idx])
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, latents, token_ids, k_loss)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        d = ema_decay(i.astype(jnp.float32), args.ema)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return (params, ema, opt_state, i + 1), {"loss": loss, "mse": metrics["mse"]}

    state = (params, params, opt.init(params), jnp.zeros((), jnp.int32))
    (_, ema, _, _), log = run_steps("unet+text", step, state, args.steps_unet, train_key, args.log_every)
    log.update(batch_size=args.batch_unet, learning_rate=args.lr_unet, caption_dropout=args.caption_dropout,
               min_snr_gamma=args.min_snr_gamma, ema_decay=args.ema, unet_params=count(ema["unet"]),
               text_encoder_params=count(ema["text_encoder"]))
    return ema, log


# --- saving as a diffusers folder -----------------------------------------------------------------------------------

# sdjax runs these PyTorch 1x1 convolutions as Dense layers; diffusers stores them as (out, in, 1, 1).
def torch_state_dict(params: Mapping[str, Any], dtype: Any = np.float16) -> dict[str, np.ndarray]:
    # The default UNet uses linear projections, so only the shortcut / quant convs are 1x1 convs in PyTorch.
    state = checkpoint.torch_state_dict(jax.device_get(params))
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in state.items()}


MODEL_CARD = """# sdjax default model

A small Stable Diffusion model (StableDiffusionPipeline layout, 64x64 pixels, 8x8x4 latents) trained from scratch
on synthetic shapes by `examples/train_default.py` in a few tens of CPU minutes. It draws one circle, square or
triangle in red, green, blue, yellow, white or black on a background of another of those colours, from captions
exactly like `a red circle on a blue background`. Anything else is out of its world.

    import sdjax
    pipe = sdjax.load()   # this folder
    images = pipe.text_to_image("a red circle on a blue background", num_steps=20, guidance_scale=5)

Classifier-free guidance 2-7.5 with euler / euler_a / heun / dpmpp_2m / unipc / ddim at 20 steps is reliable;
the 4th-order multistep samplers (pndm, lms) need ~50 steps above guidance 3. Weights are float16 safetensors;
`training_log.json` records how it was trained. diffusers' `StableDiffusionPipeline.from_pretrained` loads it too.
"""


def save_folder(out: Path, configs: dict[str, dict], params: dict[str, Any], log: dict) -> int:
    from safetensors.numpy import save_file

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    for name, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(configs[name], indent=2) + "\n")
        state = torch_state_dict(params[name])
        if name == "text_encoder":
            state = {"text_model." + k: v for k, v in state.items()}  # the hub layout every version reads
        save_file(state, str(folder / f"{file}.safetensors"), metadata={"format": "pt"})
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (tmp / "tokenizer").mkdir()
    for src in (SHIPPED_DIR / "bpe" / "vocab.json", SHIPPED_DIR / "bpe" / "merges.txt",
                SHIPPED_DIR / "clip" / "tokenizer_config.json"):
        shutil.copyfile(src, tmp / "tokenizer" / src.name)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (tmp / "README.md").write_text(MODEL_CARD)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


# --- main ------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL, help="output diffusers folder (default: the shipped "
                    "sdjax/assets/default_model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=12000, help="synthetic training images (one fixed pool)")
    ap.add_argument("--steps-vae", type=int, default=1200)
    ap.add_argument("--steps-unet", type=int, default=1800)
    ap.add_argument("--batch-vae", type=int, default=16)
    ap.add_argument("--batch-unet", type=int, default=64)
    ap.add_argument("--lr-vae", type=float, default=2e-3)
    ap.add_argument("--lr-unet", type=float, default=8e-4)
    ap.add_argument("--kl-weight", type=float, default=5e-4)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="minimal architectures (for a quick end-to-end test)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    key = jax.random.key(args.seed)
    k_vae, k_unet = jax.random.split(key)
    log: dict[str, Any] = {"seed": args.seed, "arguments": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()},
                           "jax": jax.__version__, "devices": str(jax.devices())}

    t0 = time.time()
    data = shapes.make_batch(args.seed, args.images)
    print(f"data: {args.images} images in {time.time() - t0:.1f}s", flush=True)
    log["data_s"] = round(time.time() - t0, 1)

    configs = {"vae": vae_config(args.tiny), "text_encoder": text_encoder_config(args.tiny)}
    vae_cfg = VAEConfig.from_dict(configs["vae"])
    vae_params, log["vae"] = train_vae(vae_cfg, data.images, args, k_vae)
    log["vae"]["reconstruction_l1_0_1"] = reconstruction_error(vae_cfg, vae_params, data.images[:256])
    print(f"[vae] reconstruction L1 (pixels in [0, 1]): {log['vae']['reconstruction_l1_0_1']:.4f}", flush=True)

    t0 = time.time()
    means, logvars = encode_all(vae_cfg, vae_params, data.images)
    samples = means + np.exp(0.5 * logvars) * np.random.default_rng(args.seed).standard_normal(means.shape)
    scale = float(f"{1.0 / samples.std():.5g}")
    configs["vae"]["scaling_factor"] = scale
    log["latents"] = {"encode_s": round(time.time() - t0, 1), "scaling_factor": scale,
                      "posterior_std_mean": float(np.exp(0.5 * logvars).mean()), "shape": list(means.shape[1:])}
    print(f"latents: {means.shape} encoded in {time.time() - t0:.1f}s, scaling_factor {scale}", flush=True)

    tokenizer = load_tokenizer(None, convention="clip")
    ids, _ = tokenize(tokenizer, data.captions)
    empty_ids, _ = tokenize(tokenizer, [""])
    text_cfg = CLIPTextConfig.from_dict(configs["text_encoder"])
    configs["unet"] = unet_config(args.tiny, means.shape[1], text_cfg.hidden_size)
    unet_cfg = UNetConfig.from_dict(configs["unet"])
    scheduler = SchedulerConfig.from_dict(SCHEDULER_CONFIG)
    trained, log["unet"] = train_unet(unet_cfg, text_cfg, scheduler, means, logvars, scale, ids, empty_ids[0],
                                      args, k_unet)

    log["wall_time_s"] = round(time.time() - t_start, 1)
    size = save_folder(args.out, configs, {"vae": vae_params, **trained}, log)
    log["folder_bytes"] = size
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    summary = {"seed": args.seed, "wall_time_s": log["wall_time_s"], "size_mb": round(size / 1e6, 2),
               "vae": {k: log["vae"][k] for k in ("steps", "final_loss", "reconstruction_l1_0_1", "params")},
               "unet": {k: log["unet"][k] for k in ("steps", "final_loss", "unet_params", "text_encoder_params")}}
    print(json.dumps(summary, indent=2))
    print(f"saved to {args.out} ({math.ceil(size / 1e5) / 10} MB)")
    return log


if __name__ == "__main__":
    main()
