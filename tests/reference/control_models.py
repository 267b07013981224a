"""Tiny diffusers ControlNetModel / T2IAdapter configs, random initialisation, and an LDM control-file writer
(reference for tests).

The writer builds A1111 / lllyasviel key names (``control_model.input_hint_block.N``, ``zero_convs.N.0``,
``middle_block_out.0``) from diffusers' by index arithmetic, reusing the independent UNet writer of
tests/reference/single_file_writer.py for the encoder copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tests.reference.single_file_writer import unet_to_ldm

# SD 1.x-like: as tests/reference/unet_configs.SD1, with an 8x conditioning embedding of toy width.
CONTROLNET_SD1: dict[str, Any] = dict(
    in_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=8, conditioning_embedding_out_channels=(8, 8, 16, 16),
)
# SD 2.x-like: linear projections, per-level head counts, upcast attention, a context width of 48.
CONTROLNET_SD2: dict[str, Any] = dict(
    CONTROLNET_SD1, use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True,
    cross_attention_dim=48, layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
)
# SDXL-like: as unet_configs.SDXL (no attention at level 0, two transformer layers at the bottom, text_time).
CONTROLNET_SDXL: dict[str, Any] = dict(
    in_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, conditioning_embedding_out_channels=(8, 16, 16, 16),
)
# Every other knob: BGR order, one-channel conditioning, global pooling (shuffle), a resnet-only mid block,
# num_attention_heads given (it wins over attention_head_dim), SD2-like per-level heads.
CONTROLNET_EXOTIC: dict[str, Any] = dict(
    CONTROLNET_SD1, controlnet_conditioning_channel_order="bgr", conditioning_channels=1,
    global_pool_conditions=True, mid_block_type="UNetMidBlock2D", num_attention_heads=(2, 4), attention_head_dim=7,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
    conditioning_embedding_out_channels=(8, 16), flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5,
)
CONTROLNET_CONFIGS = {"sd1": CONTROLNET_SD1, "sd2": CONTROLNET_SD2, "sdxl": CONTROLNET_SDXL,
                      "exotic": CONTROLNET_EXOTIC}


def randomise_fan_in(module: torch.nn.Module, seed: int) -> None:
    """Fresh random weights everywhere (ControlNet's zero convs included: zeros would hide every mistake):
    norm scales near one, biases small, kernels fan-in scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))


def build_torch_controlnet(name_or_config: str | Mapping[str, Any], seed: int = 0):
    from diffusers import ControlNetModel

    config = CONTROLNET_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    model = ControlNetModel(**config).eval()
    randomise_fan_in(model, seed)
    return model


def controlnet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = "control_model."
                      ) -> dict[str, torch.Tensor]:
    """ControlNetModel state dict -> LDM ControlNet keys (with ``prefix``)."""
    hint_levels = len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    out: dict[str, torch.Tensor] = {}
    encoder: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        parts = module.split(".")
        if parts[0] == "controlnet_cond_embedding":
            if parts[1] == "conv_in":
                index = 0
            elif parts[1] == "conv_out":
                index = 2 * (2 * hint_levels - 1)
            else:
                index = 2 * (int(parts[2]) + 1)
            out[f"input_hint_block.{index}.{leaf}"] = value
        elif parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{leaf}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{leaf}"] = value
        else:
            encoder[key] = value
    layers = config["layers_per_block"] if "layers_per_block" in config else 2
    down = config["down_block_types"]
    up = ["CrossAttnUpBlock2D" if "CrossAttn" in t else "UpBlock2D" for t in reversed(down)]
    out.update(unet_to_ldm(encoder, {"layers_per_block": layers, "up_block_types": up, "down_block_types": down}))
    return {prefix + k: v for k, v in out.items()}


def controlnet_for(torch_unet, seed: int = 0, embedding_channels: tuple[int, ...] = (8, 8, 16, 16)):
    """A random ControlNet with the encoder of ``torch_unet`` (diffusers' ``ControlNetModel.from_unet``), for
    pipeline-level tests on the tiny pipelines; the conditioning embedding is 8x, as the real ones."""
    from diffusers import ControlNetModel

    model = ControlNetModel.from_unet(torch_unet, conditioning_embedding_out_channels=embedding_channels,
                                      load_weights_from_unet=False).eval()
    randomise_fan_in(model, seed)
    return model
