"""Full-size random-weight diffusers pipelines from sdjax's shipped configs, saved once to a folder that
sdjax.load reads: both frameworks then run the same weights. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "sdjax" / "assets" / "configs"


def _config(kind: str, part: str) -> dict[str, Any]:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((CONFIGS / kind / part / name).read_text())


def build_pipeline(kind: str = "sd1", dtype: Any = None) -> Any:
    """A diffusers pipeline of the public model's shape (``sd1``: SD1.5, ``sdxl``: SDXL base), random weights,
    Euler scheduler (sdjax's ``euler``)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdjax.tokenizer import load_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(_config(kind, "unet"))
    vae = diffusers.AutoencoderKL.from_config(_config(kind, "vae"))
    scheduler = diffusers.EulerDiscreteScheduler.from_config(_config(kind, "scheduler"))
    text = CLIPTextModel(CLIPTextConfig(**_config(kind, "text_encoder")))
    parts = dict(vae=vae, text_encoder=text, tokenizer=load_tokenizer(None, convention="clip"), unet=unet,
                 scheduler=scheduler)
    if kind == "sdxl":
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config(kind, "text_encoder_2")))
        pipe = diffusers.StableDiffusionXLPipeline(text_encoder_2=text_2,
                                                   tokenizer_2=load_tokenizer(None, convention="openclip"), **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False, **parts)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved(pipe: Any, folder: Path) -> Path:
    if not (folder / "model_index.json").exists():
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder
