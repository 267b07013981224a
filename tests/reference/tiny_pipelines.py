"""Tiny random-weight diffusers pipelines (SD1, SD2 v-prediction, SDXL base/refiner, inpainting), saved as
diffusers folders, for end-to-end parity tests. Nothing is downloaded: configs are written here and the
tokenizer is sdjax's shipped CLIP vocabulary (49408 tokens, so prompts tokenize exactly as the real models').
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdjax.tokenizer import load_tokenizer

SD1_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
    prediction_type="epsilon", timestep_spacing="leading",
)


def _unet(**overrides: Any) -> dict[str, Any]:
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    config.update(overrides)
    return config


def _vae(**overrides: Any) -> dict[str, Any]:
    # Four levels: the real downsampling factor of 8 with tiny channel counts.
    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=64,
    )
    config.update(overrides)
    return config


def _clip(**overrides: Any) -> dict[str, Any]:
    config = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=49406,
        eos_token_id=2, pad_token_id=1,
    )
    config.update(overrides)
    return config


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Fresh random weights everywhere (diffusers zero-initialises some layers); norms stay near one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_scale else noise * (3.0 if p.ndim == 1 else 1.0))


def _hf_tokenizer(convention: str):
    from transformers import CLIPTokenizer

    # diffusers saves whatever tokenizer object it is given; a plain CLIPTokenizer keeps the folder standard.
    tok = load_tokenizer(None, convention=convention)
    assert isinstance(tok, CLIPTokenizer)
    return tok


def build(kind: str, seed: int = 0) -> Any:
    """A diffusers pipeline of the given kind with random weights: 'sd1', 'sd2', 'sdxl', 'sdxl_refiner',
    'sd1_inpaint'."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if kind in ("sd1", "sd1_inpaint", "sd2"):
        sd2 = kind == "sd2"
        unet = diffusers.UNet2DConditionModel(**_unet(
            in_channels=9 if kind == "sd1_inpaint" else 4,
            **(dict(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True) if sd2 else {}),
        ))
        vae = diffusers.AutoencoderKL(**_vae())
        text = CLIPTextModel(CLIPTextConfig(**_clip(**(dict(hidden_act="gelu") if sd2 else {}))))
        prediction = "v_prediction" if sd2 else "epsilon"
        scheduler = diffusers.PNDMScheduler(**{**SD1_SCHEDULER, "prediction_type": prediction})
        cls = diffusers.StableDiffusionInpaintPipeline if kind == "sd1_inpaint" else diffusers.StableDiffusionPipeline
        pipe = cls(vae=vae, text_encoder=text, tokenizer=_hf_tokenizer("openclip" if sd2 else "clip"), unet=unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind in ("sdxl", "sdxl_refiner"):
        refiner = kind == "sdxl_refiner"
        unet = diffusers.UNet2DConditionModel(**_unet(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 32,
            cross_attention_dim=32 if refiner else 64,
        ))
        vae = diffusers.AutoencoderKL(**_vae(scaling_factor=0.13025, force_upcast=True))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clip(hidden_act="gelu", eos_token_id=49407)))
        scheduler = diffusers.EulerDiscreteScheduler(**{k: v for k, v in SD1_SCHEDULER.items()
                                                        if k not in ("skip_prk_steps", "set_alpha_to_one")})
        if refiner:
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
                tokenizer_2=_hf_tokenizer("openclip"), unet=unet, scheduler=scheduler,
                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        else:
            text = CLIPTextModel(CLIPTextConfig(**_clip()))
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=_hf_tokenizer("clip"),
                tokenizer_2=_hf_tokenizer("openclip"), unet=unet, scheduler=scheduler)
    else:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}")
    for i, component in enumerate((pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None),
                                   getattr(pipe, "text_encoder_2", None))):
        if component is not None:
            _randomise(component, seed * 10 + i)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(kind: str, folder: Path, seed: int = 0) -> Any:
    """Build, save as a diffusers folder (safetensors), and return the PyTorch pipeline."""
    pipe = build(kind, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
