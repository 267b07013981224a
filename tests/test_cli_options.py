"""The options people reach for first, each through a subprocess on a tiny model: inpainting with A1111's
resize modes (image and mask resized alike), LoRA and embedding files, JPEG with EXIF metadata, a random seed
that is recorded, --devices, and the SDXL refiner with --prompt-2."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reference import lora_writer, tiny_pipelines
from tests.test_cli import _fields, run_cli

LORA_TARGET = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_inpainting_with_resize_mode_lora_embedding_and_jpeg(tmp_path, cache) -> None:
    from sdjax.hashes import short_hash

    model = tmp_path / "tiny-sd1"
    torch_pipe = tiny_pipelines.save("sd1", model, seed=3)
    shape = tuple(torch_pipe.unet.state_dict()[LORA_TARGET[1]].shape)
    lora = lora_writer.save_safetensors(lora_writer.kohya_lora({LORA_TARGET[0]: shape}, rank=2, alpha=1.0, seed=0),
                                        tmp_path / "detail.safetensors")
    width = torch_pipe.text_encoder.config.hidden_size
    embedding = lora_writer.a1111_pt(tmp_path / "mystyle.pt", "mystyle",
                                     np.random.default_rng(0).normal(0, 0.02, (2, width)))
    y, x = np.mgrid[0:50, 0:100]
    Image.fromarray(np.stack([x * 2, y * 5, (x + y) % 256], -1).astype(np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(((x < 50) * 255).astype(np.uint8)).save(tmp_path / "mask.png")  # repaint the left half
    out = tmp_path / "out"
    proc = run_cli("generate", "--model", model, "--prompt", "a photo in mystyle", "--embedding", embedding,
                   "--lora", f"{lora}:0.7", "--image", tmp_path / "in.png",
                   "--mask", tmp_path / "mask.png", "--width", "64", "--height", "48",
                   "--resize-mode", "fill", "--strength", "0.6", "--steps", "2", "--devices", "1",
                   "--format", "jpg", "--out", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    [image] = list(out.iterdir())
    match = re.fullmatch(r"00000-(\d+)\.jpg", image.name)
    assert match, image.name
    assert Image.open(image).size == (64, 48)
    fields = _fields(image)  # read back from EXIF UserComment
    assert fields["Seed"] == match.group(1) and f"seed {match.group(1)}" in proc.stdout  # the random seed
    assert fields["Denoising strength"] == "0.6" and fields["Size"] == "64x48" and fields["Model"] == "tiny-sd1"
    assert fields["Lora hashes"] == f"detail: {short_hash(lora)}" and fields["Lora weights"] == "detail: 0.7"
    assert fields["TI hashes"] == f"mystyle: {short_hash(embedding)}"
    assert fields["Model hash"] == short_hash(model)
    assert "merging 1 LoRA(s)" in proc.stderr and "warning" not in proc.stderr


def test_sdxl_refiner_and_second_prompt(tmp_path, cache) -> None:
    base, refiner = tmp_path / "base", tmp_path / "refiner"
    tiny_pipelines.save("sdxl", base, seed=1)
    tiny_pipelines.save("sdxl_refiner", refiner, seed=2)
    out = tmp_path / "out"
    proc = run_cli("generate", "--model", base, "--refiner", refiner, "--refiner-switch", "0.5", "--prompt", "a cat",
                   "--prompt-2", "oil painting", "--negative-prompt-2", "photo", "--steps", "4", "--height", "64",
                   "--width", "64", "--seed", "11", "--sampler", "DPM++ 2M Karras", "--out", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    fields = _fields(out / "00000-11.png")
    assert fields["Refiner switch at"] == "0.5" and fields["Refiner"].startswith("refiner [")
    assert fields["Prompt 2"] == "oil painting" and fields["Negative prompt 2"] == "photo"
    assert fields["Sampler"] == "DPM++ 2M Karras"
    assert "loading refiner" in proc.stderr
