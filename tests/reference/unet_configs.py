"""Tiny diffusers UNet2DConditionModel configs, one per model family sdjax supports (a few thousand to ~1M params).

Each is a plain dict of ``UNet2DConditionModel(**config)`` keyword arguments (also valid as a config.json).
They keep each family's structure (which levels attend, linear vs conv projections, per-level head counts,
SDXL's text_time embedding, LCM's timestep_cond) at toy width.
"""

from __future__ import annotations

from typing import Any

SD1: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)

# Linear projections, per-level head counts (SD2's (5, 10, 20, 20)), upcast attention, a context width of 48.
SD2: dict[str, Any] = dict(
    SD1, use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True, cross_attention_dim=48,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# SDXL base: no attention at level 0, two transformer layers at the bottom, context = two encoders (32 + 32),
# pooled text (32) + 6 time ids x 8 -> 80 extra embedding features.
SDXL_POOLED_DIM = 32
SDXL: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
    use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + SDXL_POOLED_DIM,
)

# SDXL refiner: four levels (attention in the middle two), one encoder (OpenCLIP bigG: context = pooled width),
# 5 time ids (aesthetic score instead of target size). One resnet per level (the real one has 2) keeps it quick.
SDXL_REFINER: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 48, 48),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2, attention_head_dim=(2, 4, 6, 6), cross_attention_dim=32,
    use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 32,
)

# Inpainting: latents + mask + masked-image latents in. (One resnet per level: SD1 already covers two.)
SD1_INPAINT: dict[str, Any] = dict(SD1, in_channels=9, layers_per_block=1)

# LCM (e.g. LCM_Dreamshaper): the guidance scale enters as an embedding through time_embedding.cond_proj.
LCM: dict[str, Any] = dict(SD1, time_cond_proj_dim=16, layers_per_block=1)

# Not a real family: every other knob sdjax honours set away from its default, plus keys that diffusers' blocks
# never read (resnet_out_scale_factor, resnet_skip_time_act, mid_block_only_cross_attention, dropout) set to
# non-defaults, to prove they change nothing.
EXOTIC: dict[str, Any] = dict(
    SD1, flip_sin_to_cos=False, freq_shift=1, center_input_sample=True, mid_block_scale_factor=1.5,
    layers_per_block=(1, 2), transformer_layers_per_block=(2, 1), cross_attention_dim=(32, 32),
    time_embedding_dim=48, conv_in_kernel=5, conv_out_kernel=1, downsample_padding=1, norm_eps=1e-4,
    out_channels=3, attention_head_dim=(4, 8), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    resnet_out_scale_factor=2.0, resnet_skip_time_act=True, mid_block_only_cross_attention=True, dropout=0.1,
)

# Distilled SDXL (SSD-1B / Segmind Vega style): transformer depth per layer, different in the up blocks (diffusers'
# reverse_transformer_layers_per_block), and no mid block (BK-SDM small/tiny style).
DISTILLED: dict[str, Any] = dict(
    SDXL, transformer_layers_per_block=(1, (1, 2), (2, 0)),
    reverse_transformer_layers_per_block=((3, 1, 2), (0, 2, 1), 1), mid_block_type=None,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl_refiner": SDXL_REFINER, "sd1_inpaint": SD1_INPAINT, "lcm": LCM,
    "exotic": EXOTIC, "distilled": DISTILLED,
}


def build_torch_unet(name_or_config: str | dict[str, Any], seed: int = 0, std: float = 1.0):
    """A diffusers UNet2DConditionModel (fp32, eval) with fresh random weights everywhere: diffusers
    zero-initialises nothing here, but biases and norms start at 0/1, which would hide mistakes."""
    import torch
    from diffusers import UNet2DConditionModel

    config = CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):  # norm scales stay near one
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.2 * noise)
            else:  # fan-in scaled, so activations stay O(1) through the depth
                p.copy_(std * noise / (p[0].numel() ** 0.5))
    return model


# The released full-size config.json files (as published on the hub), for config parsing and structure tests
# (built on the meta device / with eval_shape only: they are far too big to run in tests).
_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
REAL_SD15: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN), "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": list(_SD_UP),
}
REAL_SD21: dict[str, Any] = dict(
    REAL_SD15, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
    resnet_time_scale_shift="default", sample_size=96, upcast_attention=True, use_linear_projection=True,
    class_embed_type=None,
)
REAL_SD15_INPAINT: dict[str, Any] = dict(REAL_SD15, in_channels=9)
REAL_SDXL: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
REAL_SDXL_REFINER: dict[str, Any] = dict(
    REAL_SDXL, attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
    cross_attention_dim=1280, projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
REAL_LCM_SD15: dict[str, Any] = dict(REAL_SD15, time_cond_proj_dim=256)

REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": REAL_SD15, "sd21": REAL_SD21, "sd15_inpaint": REAL_SD15_INPAINT, "sdxl": REAL_SDXL,
    "sdxl_refiner": REAL_SDXL_REFINER, "lcm_sd15": REAL_LCM_SD15,
}
