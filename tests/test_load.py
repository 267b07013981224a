"""sdjax.load: diffusers folders in all their weight layouts, single files, and loading errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.weights import WeightMismatchError, flatten
from sdjax.models.config import ConfigError
from tests.reference import single_file_writer, tiny_pipelines


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sd1") / "model"
    torch_pipe = tiny_pipelines.save("sd1", folder, seed=5)
    return torch_pipe, folder


def _flat(pipe: sdjax.Pipeline) -> dict:
    return {k: np.asarray(v) for k, v in flatten(pipe.params).items()}


def _assert_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), atol=atol, rtol=0,
                                   err_msg="/".join(key))


def test_sharded_bin_and_fp16_layouts_load_the_same_weights(sd1, tmp_path: Path) -> None:
    import torch

    torch_pipe, folder = sd1
    reference = _flat(sdjax.load(folder))

    sharded = tmp_path / "sharded"
    torch_pipe.save_pretrained(sharded, max_shard_size="200KB")
    assert list((sharded / "unet").glob("*.safetensors.index.json")), "expected a sharded UNet"
    _assert_equal(_flat(sdjax.load(sharded)), reference)

    pickled = tmp_path / "bin"
    torch_pipe.save_pretrained(pickled, safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin"))
    _assert_equal(_flat(sdjax.load(pickled)), reference)

    half = tmp_path / "fp16"
    torch_pipe.to(torch.float16).save_pretrained(half, variant="fp16")
    torch_pipe.to(torch.float32)
    _assert_equal(_flat(sdjax.load(half, variant="fp16")), reference, atol=2e-3)
    with pytest.warns(UserWarning, match="only fp16 weights"):
        sdjax.load(half)
    with pytest.raises(CheckpointError, match="variant 'fp16'"):
        sdjax.load(folder, variant="fp16")


def test_missing_unexpected_and_misshapen_weights_are_listed(sd1, tmp_path: Path) -> None:
    _, folder = sd1
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(file)
    del weights["conv_in.weight"]
    weights["extra.weight"] = np.zeros(3, np.float32)
    weights["conv_out.bias"] = np.zeros(7, np.float32)
    save_file(weights, file)
    with pytest.raises(WeightMismatchError) as info:
        sdjax.load(broken)
    message = str(info.value)
    assert "conv_in/kernel" in message and "extra.weight" in message and "conv_out.bias" in message


def test_unsupported_component_and_config_value(sd1, tmp_path: Path) -> None:
    _, folder = sd1
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["controlnet"] = ["diffusers", "ControlNetModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="controlnet"):
        sdjax.load(other)
    del index["controlnet"]
    (other / "model_index.json").write_text(json.dumps(index))
    config = json.loads((other / "unet" / "config.json").read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        sdjax.load(other)


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        sdjax.load(tmp_path)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.safetensors"):
        sdjax.load(text)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_gives_the_same_model_as_the_folder(kind: str, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    torch_pipe = tiny_pipelines.save(kind, folder, seed=6)
    state = single_file_writer.single_file_state_dict(
        kind, torch_pipe.unet, torch_pipe.vae, getattr(torch_pipe, "text_encoder", None),
        getattr(torch_pipe, "text_encoder_2", None))
    file = tmp_path / f"{kind}.safetensors"
    single_file_writer.save_single_file(state, file)
    from_folder, from_file = sdjax.load(folder), sdjax.load(file, config=folder)
    _assert_equal(_flat(from_file), _flat(from_folder))
    assert from_file.is_sdxl == from_folder.is_sdxl
    assert from_file.force_zeros_for_empty_prompt == from_folder.force_zeros_for_empty_prompt
    prompt = "a red circle, on a blue background!"
    for name, encoder in from_folder.text_encoders.items():
        tokenizer = from_file.text_encoders[name].tokenizer
        assert tokenizer(prompt, padding="max_length")["input_ids"] == \
            encoder.tokenizer(prompt, padding="max_length")["input_ids"], name
    if kind == "sd1":
        options = dict(num_steps=3, height=64, width=64, seed=2)
        np.testing.assert_array_equal(from_file.text_to_image(prompt, **options),
                                      from_folder.text_to_image(prompt, **options))


def test_a_loaded_model_is_held_once_on_the_cpu(tiny, tmp_path: Path) -> None:
    """Loaded weights are read-only, 64-byte aligned host arrays (``convert.weights.host_array``), which the CPU
    placement uses in place: the model is not held twice (an fp32 SDXL is ~14 GB). Folders in fp32 and bf16,
    and sdjax's own checkpoints."""
    import jax
    import jax.numpy as jnp

    from sdjax import parallel
    from sdjax.checkpoint import save_checkpoint

    sd1 = tiny("sd1")
    save_checkpoint(sd1.pipe, tmp_path / "ckpt")
    mesh = parallel.data_mesh(jax.devices()[:1])
    for pipe in (sd1.pipe, sdjax.load(sd1.folder, dtype=jnp.bfloat16), sdjax.load(tmp_path / "ckpt")):
        host = jax.tree.leaves(pipe.params)
        placed = jax.tree.leaves(parallel.place_params(pipe.params, mesh))
        for h, d in zip(host, placed, strict=True):
            assert isinstance(h, np.ndarray) and h.ctypes.data % 64 == 0 and not h.flags.writeable
            assert np.shares_memory(np.asarray(d), h)
