"""diffusers/transformers models -> a single-file checkpoint in the original layout (reference for tests).

The inverse of ``sdjax.convert.single_file``, written independently of it: index arithmetic over diffusers' key
names instead of the reader's module tables, so the two cannot share a mistake. Files written here are checked
against diffusers' own ``from_single_file`` in tests/test_single_file.py.

The written files look like the real ones: an SD 2.x text encoder gets the extra final resblock and the
``text_projection`` that OpenCLIP-H carries (SD 2.x conditions on the penultimate layer, so diffusers has no
place for either), SD 1.x files carry the CLIP ``position_ids`` buffer, and every file has the DDPM schedule
buffers and EMA bookkeeping of a CompVis checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

Tensors = dict[str, torch.Tensor]

# base family -> key prefix of each text encoder in the single file
_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "sdxl_refiner": {"text_encoder_2": "conditioner.embedders.0.model."},
}


def single_file_state_dict(
    family: str,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    seed: int = 0,
) -> Tensors:
    """Assemble the single-file state dict of ``family`` (e.g. "sd1", "sdxl_inpaint") from diffusers models."""
    base = family.removesuffix("_inpaint")
    out: Tensors = {}
    out.update(_prefixed("model.diffusion_model.", unet_to_ldm(unet.state_dict(), dict(unet.config))))
    out.update(_prefixed("first_stage_model.", vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))))
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, prefix in _ENCODER_PREFIXES[base].items():
        model = encoders[name]
        if model is None:
            raise ValueError(f"{family} needs {name}")
        state = with_text_model_prefix(model.state_dict())
        if prefix.endswith(".transformer."):
            weights = clip_to_ldm(state)
        else:
            weights = openclip_to_ldm(state, sd2_extras=base == "sd2", seed=seed)
        out.update(_prefixed(prefix, weights))
    # Buffers a CompVis LatentDiffusion checkpoint carries outside the three components.
    out["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def save_single_file(state_dict: Mapping[str, torch.Tensor], path: str | Path, global_step: int | None = None) -> None:
    """``.safetensors`` via safetensors; anything else as a Lightning-style ``{"state_dict": ...}`` pickle."""
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
        return
    payload: dict = {"state_dict": tensors, "epoch": 3}
    if global_step is not None:
        payload["global_step"] = global_step
    torch.save(payload, path)


# --- UNet --------------------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> Tensors:
    """UNet2DConditionModel state dict -> LDM ``UNetModel`` keys (no ``model.diffusion_model.`` prefix)."""
    levels = len(config["down_block_types"])
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    # LDM numbers input blocks consecutively: per level its resnets, then the downsampler slot (none on the last
    # level); output blocks run over the levels in reverse with one more resnet each.
    down_start = [1 + sum(n + 1 for n in layers[:level]) for level in range(levels)]
    up_counts = [n + 1 for n in reversed(layers)]
    up_start = [sum(up_counts[:level]) for level in range(levels)]
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]

    def resnet(rest: str) -> str:
        module, leaf = rest.split(".", 1)
        return f"{_RESNET_TO_LDM[module]}.{leaf}"

    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
            lambda m: f"input_blocks.{down_start[int(m[1])] + int(m[2])}.0.{resnet(m[3])}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
            lambda m: f"input_blocks.{down_start[int(m[1])] + int(m[2])}.1.{m[3]}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
            lambda m: f"input_blocks.{down_start[int(m[1])] + layers[int(m[1])]}.0.op.{m[2]}",
        ),
        (r"mid_block\.resnets\.(\d)\.(.*)", lambda m: f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
            lambda m: f"output_blocks.{up_start[int(m[1])] + int(m[2])}.0.{resnet(m[3])}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
            lambda m: f"output_blocks.{up_start[int(m[1])] + int(m[2])}.1.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
            lambda m: (
                f"output_blocks.{up_start[int(m[1])] + up_counts[int(m[1])] - 1}."
                f"{2 if up_has_attention[int(m[1])] else 1}.conv.{m[2]}"
            ),
        ),
    ]
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module in _UNET_FIXED_TO_LDM:
            out[f"{_UNET_FIXED_TO_LDM[module]}.{leaf}"] = value
            continue
        for pattern, build in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[build(match)] = value
                break
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return out


# --- VAE ---------------------------------------------------------------------------------------------------------

_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: Mapping[str, torch.Tensor], levels: int) -> Tensors:
    """AutoencoderKL state dict -> LDM ``AutoencoderKL`` keys (no ``first_stage_model.`` prefix)."""

    def up(m: re.Match) -> str:  # LDM numbers decoder levels from the lowest resolution up
        return f"decoder.up.{levels - 1 - int(m[1])}."

    out = {}
    for key, value in state.items():
        new = key
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attention = re.match(r"(.*)mid_block\.attentions\.0\.(.*)\.(weight|bias)$", new)
        if attention:
            prefix, module, leaf = attention.groups()
            new = f"{prefix}mid.attn_1.{_VAE_ATTENTION_TO_LDM[module]}.{leaf}"
            if leaf == "weight" and module != "group_norm":
                value = value[:, :, None, None]  # LDM projects with 1x1 convs
        out[new] = value
    return out


# --- text encoders -----------------------------------------------------------------------------------------------


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> Tensors:
    """transformers CLIPTextModel -> the same keys (LDM embeds the transformers model), plus its buffer."""
    out = dict(state)
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


_OPENCLIP_LAYER_TO_LDM = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_to_ldm(state: Mapping[str, torch.Tensor], sd2_extras: bool = False, seed: int = 0) -> Tensors:
    """CLIPTextModel(WithProjection) -> OpenCLIP text tower keys (no ``...model.`` prefix).

    ``sd2_extras`` adds what a real SD 2.x file has and diffusers drops: one more resblock and a text_projection.
    """
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(4.6052),
    }
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    for n in range(layers):
        src, dst = f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}"
        for leaf in ("weight", "bias"):
            out[f"{dst}.attn.in_proj_{leaf}"] = torch.cat(
                [state[f"{src}.self_attn.{p}_proj.{leaf}"] for p in "qkv"], dim=0
            )
            for ours, theirs in _OPENCLIP_LAYER_TO_LDM.items():
                out[f"{dst}.{theirs}.{leaf}"] = state[f"{src}.{ours}.{leaf}"]
    width = out["positional_embedding"].shape[1]
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T  # OpenCLIP computes x @ P
    if sd2_extras:
        gen = torch.Generator().manual_seed(seed)
        last = f"transformer.resblocks.{layers - 1}."
        extra = {k.replace(last, f"transformer.resblocks.{layers}."): v for k, v in out.items() if k.startswith(last)}
        out.update({k: _random_like(v, gen) for k, v in extra.items()})
        out["text_projection"] = _random_like(out["positional_embedding"].new_empty(width, width), gen)
    return out


# --- helpers -----------------------------------------------------------------------------------------------------


def with_text_model_prefix(state: Mapping[str, torch.Tensor]) -> Tensors:
    """transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); the checkpoints keep the prefix."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()}


def _random_like(tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if tensor.is_meta:  # shape-only models (built under accelerate's init_empty_weights) stay shape-only
        return torch.empty_like(tensor)
    return torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


# --- tiny random models and their diffusers-style config folder ----------------------------------------------------

_TINY_CLIP = dict(
    vocab_size=99, intermediate_size=37, num_attention_heads=4, max_position_embeddings=16, layer_norm_eps=1e-5
)
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, sample_size=16)
_TINY_SDXL_TIME = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True)


def _tiny_unet_config(family: str) -> dict:
    base = family.removesuffix("_inpaint")
    common = dict(sample_size=8, in_channels=9 if family.endswith("_inpaint") else 4, out_channels=4, norm_num_groups=8)
    if base == "sd1":  # one resnet per level, attention only on the first level, conv projections
        return common | dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    if base == "sd2":  # attention on every level (upsampler after the attention), linear projections
        return common | dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
            use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2,
        )
    if base == "sdxl":  # CLIP-L (32) and bigG (48) contexts concatenated; time ids 6 x 8 + pooled bigG (24)
        return (
            common
            | _TINY_SDXL_TIME
            | dict(
                block_out_channels=(32, 64),
                layers_per_block=2,
                attention_head_dim=(2, 4),
                cross_attention_dim=80,
                transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=6 * 8 + 24,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            )
        )
    if base == "sdxl_refiner":  # attention only in the middle level; time ids 5 x 8 + pooled bigG (24)
        return (
            common
            | _TINY_SDXL_TIME
            | dict(
                block_out_channels=(32, 64, 64),
                layers_per_block=1,
                attention_head_dim=(2, 4, 4),
                cross_attention_dim=48,
                transformer_layers_per_block=2,
                projection_class_embeddings_input_dim=5 * 8 + 24,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            )
        )
    raise ValueError(f"no tiny config for {family}")


def tiny_models(family: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Random-weight tiny diffusers/transformers components of ``family`` (every weight random, none zero)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = family.removesuffix("_inpaint")
    two_levels = dict(block_out_channels=(16, 32), layers_per_block=1)
    three_levels = dict(block_out_channels=(16, 32, 32), layers_per_block=2)
    vae_shape = two_levels if base in ("sd1", "sdxl_refiner") else three_levels
    vae_levels = len(vae_shape["block_out_channels"])
    models: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel(**_tiny_unet_config(family)),
        "vae": AutoencoderKL(
            **_TINY_VAE,
            **vae_shape,
            down_block_types=("DownEncoderBlock2D",) * vae_levels,
            up_block_types=("UpDecoderBlock2D",) * vae_levels,
        ),
    }
    clip_l = CLIPTextConfig(**_TINY_CLIP, hidden_size=32, num_hidden_layers=2, hidden_act="quick_gelu")
    open_clip = CLIPTextConfig(**_TINY_CLIP, hidden_size=32, num_hidden_layers=2, hidden_act="gelu")
    big_g = CLIPTextConfig(**_TINY_CLIP, hidden_size=48, num_hidden_layers=3, hidden_act="gelu", projection_dim=24)
    if base == "sd1":
        models["text_encoder"] = CLIPTextModel(clip_l)
    elif base == "sd2":
        models["text_encoder"] = CLIPTextModel(open_clip)
    if base == "sdxl":
        models["text_encoder"] = CLIPTextModel(clip_l)
    if base in ("sdxl", "sdxl_refiner"):
        models["text_encoder_2"] = CLIPTextModelWithProjection(big_g)
    for offset, model in enumerate(models.values()):
        randomise(model, seed + offset)
    return models


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Distinct random values in every parameter, so a swapped or dropped weight cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def write_config_folder(models: Mapping[str, torch.nn.Module], folder: str | Path, shipped: str | Path) -> Path:
    """A diffusers-style config folder for tiny ``models``: their configs plus ``shipped``'s scheduler/index."""
    import shutil

    folder = Path(folder)
    for name, model in models.items():
        if name.startswith("text_encoder"):
            model.config.save_pretrained(folder / name)
        else:
            model.save_config(folder / name)
    shipped = Path(shipped)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    return folder
