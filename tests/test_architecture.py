"""Architectures read from the weights: unusual and distilled tiny checkpoints load from a single file alone and
give the images of their diffusers folders; standard checkpoints get the shipped family configs back."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sdjax
from sdjax.convert.single_file import config_dir, split_single_file
from sdjax.models.clip import CLIPTextConfig
from sdjax.models.unet import UNetConfig
from sdjax.tokenizer import load_tokenizer
from tests.reference import single_file_writer

_META = ("_class_name", "_diffusers_version", "architectures", "transformers_version", "torch_dtype", "_name_or_path")

# Unusual shapes that still follow each family's conventions for what weights cannot show (32 norm groups; SD1
# UNets 8 heads, SD2/SDXL UNets and text encoders 64 channels per head; SDXL's 256-wide time-id embedding).
_TEXT = dict(hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=1)
CASES: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {  # BK-SDM style: one layer per block, no mid block; a 4x VAE (three levels)
        "unet": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None),
        "vae": dict(block_out_channels=(32, 32, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        "text_encoder": _TEXT,
    },
    "sd2": {  # layers and transformer depth per block; a 2x VAE (two levels)
        "unet": dict(block_out_channels=(64, 128), layers_per_block=(1, 2), attention_head_dim=(1, 2),
                     transformer_layers_per_block=(2, 1), cross_attention_dim=64,
                     down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        "text_encoder": _TEXT,
    },
    "sdxl": {  # SSD-1B / Vega style: depth per layer, other depths in the up blocks; VAE without mid attention
        "unet": dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=(1, 2),
                     transformer_layers_per_block=(1, (1, 2)), reverse_transformer_layers_per_block=((2, 0, 1), 1),
                     cross_attention_dim=128, projection_class_embeddings_input_dim=6 * 256 + 16,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        "vae": dict(block_out_channels=(32, 64, 64), layers_per_block=1, mid_block_add_attention=False,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        "text_encoder": _TEXT,
        "text_encoder_2": dict(_TEXT, num_hidden_layers=3, projection_dim=16),
    },
}
_CONFIG_NAME = {"sd1": "sd1", "sd2": "sd2_v", "sdxl": "sdxl"}


def _shipped(name: str, component: str) -> dict[str, Any]:
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    raw = json.loads((config_dir(name) / component / file).read_text())
    return {k: v for k, v in raw.items() if k not in _META}


def _build(family: str, seed: int) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    name = _CONFIG_NAME[family]
    models: dict[str, torch.nn.Module] = {}
    for component, overrides in CASES[family].items():
        config = {**_shipped(name, component), **overrides}
        if component == "unet":
            models[component] = UNet2DConditionModel(**config)
        elif component == "vae":
            models[component] = AutoencoderKL(**config)
        else:
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            models[component] = cls(HFConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    for i, model in enumerate(models.values()):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if p.ndim == 1 and key.endswith("weight") else noise / p[0].numel() ** 0.5)
    return models


def _save_folder(family: str, models: dict[str, torch.nn.Module], folder: Path) -> None:
    name = _CONFIG_NAME[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for component, model in models.items():
            model.save_pretrained(folder / component)
    shutil.copytree(config_dir(name) / "scheduler", folder / "scheduler")
    shutil.copy(config_dir(name) / "model_index.json", folder / "model_index.json")
    for component, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if component in models:
            convention = "clip" if family != "sd2" and component == "text_encoder" else "openclip"
            load_tokenizer(None, convention=convention).save_pretrained(str(folder / tokenizer))


@pytest.fixture(scope="module", params=list(CASES))
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    models = _build(family, seed=len(family))
    _save_folder(family, models, root / "folder")
    state = single_file_writer.single_file_state_dict(family, **models)
    file = root / f"{family}.safetensors"
    single_file_writer.save_single_file(state, file)
    return family, root / "folder", file


def test_unusual_single_file_loads_alone_and_matches_its_folder(written, fast_compile) -> None:
    family, folder, file = written
    from_folder, from_file = sdjax.load(folder), sdjax.load(file)
    assert from_file.unet.config == from_folder.unet.config
    assert from_file.vae.config == from_folder.vae.config
    for name, encoder in from_folder.text_encoders.items():
        assert from_file.text_encoders[name].config == encoder.config, name
    options = dict(num_steps=2, height=32, width=32, seed=3, guidance_scale=5.0)
    a = from_folder.text_to_image(["a red square", "two blue circles"], **options)
    b = from_file.text_to_image(["a red square", "two blue circles"], **options)
    assert a.std() > 0.01
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_convert_cli_needs_no_options(written, tmp_path: Path) -> None:
    from sdjax.cli import main

    family, folder, file = written
    if family != "sdxl":  # one family is enough for the CLI; the loading itself is checked above for each
        return
    assert main(["convert", str(file), str(tmp_path / "out")]) in (0, None)
    converted = sdjax.load(tmp_path / "out")
    assert converted.unet.config == sdjax.load(folder).unet.config


# --- standard checkpoints keep the shipped configs -------------------------------------------------------------


def _meta_models(family: str) -> dict[str, torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    name = "sd2_v" if family == "sd2" else family
    models: dict[str, torch.nn.Module] = {}
    with init_empty_weights():
        models["unet"] = UNet2DConditionModel(**_shipped(name, "unet"))
        models["vae"] = AutoencoderKL(**_shipped(name, "vae"))
        for component, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (config_dir(name) / component).is_dir():
                config = {k: v for k, v in _shipped(name, component).items() if k != "model_type"}
                models[component] = cls(HFConfig(**config))
    return models


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner", "sd1_inpaint"])
def test_standard_shapes_give_the_shipped_configs(family: str) -> None:
    """Full-size shapes (no weights: meta tensors, read as zero-stride arrays) infer exactly the shipped configs."""
    models = _meta_models(family)
    state = single_file_writer.single_file_state_dict(family, **models)
    arrays = {k: np.broadcast_to(np.zeros((), np.float16), tuple(v.shape)) for k, v in state.items()}
    model = split_single_file(arrays)
    name = model.config_name
    assert UNetConfig.from_dict(model.configs["unet"]) == UNetConfig.from_dict(_shipped(name, "unet"))
    assert model.configs["vae"] == json.loads((config_dir(name) / "vae" / "config.json").read_text())
    for component in model.tokenizers:
        assert CLIPTextConfig.from_dict(model.configs[component]) == CLIPTextConfig.from_dict(
            json.loads((config_dir(name) / component / "config.json").read_text())), component


def test_folder_without_configs_reads_them_from_the_weights(written, tmp_path: Path) -> None:
    family, folder, _ = written
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    components = [name for name in CASES[family] if (bare / name / "config.json").is_file()]
    for name in components:
        (bare / name / "config.json").unlink()
    with pytest.warns(UserWarning, match="no config.json"):
        from_weights = sdjax.load(bare)
    reference = sdjax.load(folder)
    unet = reference.unet.config
    if family == "sd2":  # 512-base and 768-v differ only in what weights cannot show: the 512 configs are taken
        unet = dataclasses.replace(unet, sample_size=64, upcast_attention=False)
    assert from_weights.unet.config == unet
    assert from_weights.vae.config == reference.vae.config
    for name, encoder in reference.text_encoders.items():
        assert from_weights.text_encoders[name].config == encoder.config, name
