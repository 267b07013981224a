"""Tiny diffusers ``AutoencoderKL`` configs (as in config.json) and a random-weight PyTorch reference builder."""

from __future__ import annotations

from typing import Any

_BASE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

# SD 1.x / 2.x style (downsample factor 2 here; 8 in the real model).
SD_VAE: dict[str, Any] = {**_BASE}

# SDXL style: different scaling factor, decode upcast to float32.
SDXL_VAE: dict[str, Any] = {**_BASE, "scaling_factor": 0.13025, "force_upcast": True}

# Three levels (downsample factor 4) and two resnets per block.
THREE_LEVEL_VAE: dict[str, Any] = {
    **_BASE,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 2,
    "norm_num_groups": 4,
}

# SD3 / Flux style: 16 latent channels and a shift factor; no quant convs.
SHIFT_VAE: dict[str, Any] = {
    **_BASE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": False,
}

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd": SD_VAE,
    "sdxl": SDXL_VAE,
    "three_level": THREE_LEVEL_VAE,
    "shift": SHIFT_VAE,
}


def build_reference_vae(config: dict[str, Any], seed: int = 0):
    """A diffusers ``AutoencoderKL`` in float32 eval mode with every weight perturbed by seeded noise.

    PyTorch's default init leaves norms at scale 1 / bias 0; perturbing them makes a wrong norm or bias mapping
    show up in the parity tests.
    """
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.add_(0.05 * noise)
    return vae.float().eval()
