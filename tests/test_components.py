"""sdjax.load(model, vae=..., unet=...): separate VAEs (A1111 / ComfyUI files, diffusers files and folders, the
fp16-fix VAE) and UNet-only files (SDXL-Lightning / Hyper-SD style) applied onto a base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdjax
from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.weights import flatten
from sdjax.loaders.components import with_vae
from tests.reference import single_file_writer, tiny_pipelines


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _assert_same(a, b) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SD1 folder, another VAE and UNet of its shapes (fresh weights), and that model as a folder."""
    root = tmp_path_factory.mktemp("components")
    torch_pipe = tiny_pipelines.save("sd1", root / "base", seed=1)
    other = tiny_pipelines.build("sd1", seed=2)
    with torch.no_grad():
        other.vae.quant_conv.bias[4:] = -28.0
    vae_folder = root / "vae_folder"
    other.vae.register_to_config(scaling_factor=0.5, force_upcast=False)  # as SDXL's fp16-fix VAE config says
    other.vae.save_pretrained(vae_folder)
    swapped = root / "swapped"
    torch_pipe.vae, torch_pipe.unet = other.vae, other.unet
    torch_pipe.save_pretrained(swapped)
    return root, other


def test_vae_files_in_every_layout(base, tmp_path: Path) -> None:
    root, other = base
    reference = sdjax.load(root / "swapped")
    ldm = single_file_writer.vae_to_ldm(other.vae.state_dict(), len(other.vae.config.block_out_channels))
    files = {
        "a1111.safetensors": {f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()},
        "comfy.safetensors": {k: v.contiguous() for k, v in ldm.items()},
        "diffusers.safetensors": {k: v.contiguous() for k, v in other.vae.state_dict().items()},
    }
    for name, state in files.items():
        save_file(state, str(tmp_path / name))
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}}, tmp_path / "a1111.ckpt")
    torch.save(dict(ldm), tmp_path / "plain.pt")
    base_pipe = sdjax.load(root / "base")
    assert sdjax.load(root / "base", vae=tmp_path / "a1111.safetensors").vae.config == base_pipe.vae.config
    for name in [*files, "a1111.ckpt", "plain.pt"]:
        pipe = with_vae(base_pipe, tmp_path / name)  # what load(vae=) calls after loading the model
        _assert_same(pipe.params["vae"], reference.params["vae"])
        # A file has no config: the model's VAE settings (scaling factor ...) stay.
        assert pipe.vae.config == base_pipe.vae.config, name
        _assert_same(pipe.params["unet"], base_pipe.params["unet"])


def test_vae_folder_brings_its_own_config(base, tmp_path: Path) -> None:
    root, _ = base
    pipe = sdjax.load(root / "base", vae=root / "vae_folder", dtype=jnp.bfloat16)
    assert pipe.vae.config.scaling_factor == 0.5 and not pipe.vae.config.force_upcast
    # force_upcast false (the fp16-fix VAE): the VAE follows the pipeline dtype instead of staying float32
    assert {np.asarray(v).dtype for v in flatten(pipe.params["vae"]).values()} == {np.dtype(jnp.bfloat16)}
    assert {np.asarray(v).dtype for v in flatten(sdjax.load(root / "base", dtype=jnp.bfloat16).params["vae"])
            .values()} == {np.dtype(np.float32)}
    # The same as a model folder whose vae/ is that folder: same config (scaling factor included) and weights.
    f32 = sdjax.load(root / "base", vae=root / "vae_folder")
    shutil.copytree(root / "base", tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "vae")
    shutil.copytree(root / "vae_folder", tmp_path / "model" / "vae")
    reference = sdjax.load(tmp_path / "model")
    assert reference.vae.config == f32.vae.config
    _assert_same(f32.params, reference.params)


def test_unet_files_onto_a_base(base, tmp_path: Path) -> None:
    root, other = base
    reference = sdjax.load(root / "swapped")
    state = other.unet.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "unet.safetensors"))
    ldm = single_file_writer.unet_to_ldm(state, dict(other.unet.config))
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in ldm.items()}, str(tmp_path / "ldm.safetensors"))
    for name in ("unet.safetensors", "ldm.safetensors"):
        pipe = sdjax.load(root / "base", unet=tmp_path / name)
        _assert_same(pipe.params["unet"], reference.params["unet"])
        assert pipe.unet.config == reference.unet.config
    pipe = sdjax.load(root / "base", unet=root / "swapped" / "unet", preset="sdxl-lightning-4step")
    _assert_same(pipe.params["unet"], reference.params["unet"])
    assert pipe.scheduler.timestep_spacing == "trailing"


def test_wrong_components_are_refused_naming_the_mismatch(base, tmp_path: Path) -> None:
    root, _ = base
    from diffusers import AutoencoderKL, UNet2DConditionModel

    wide = AutoencoderKL(**{**tiny_pipelines._vae(), "latent_channels": 16})
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "vae16.safetensors"))
    with pytest.raises(CheckpointError, match="16 latent channels"):
        sdjax.load(root / "base", vae=tmp_path / "vae16.safetensors")
    xl = UNet2DConditionModel(**tiny_pipelines._unet(cross_attention_dim=48))
    save_file({k: v.contiguous() for k, v in xl.state_dict().items()}, str(tmp_path / "unet48.safetensors"))
    with pytest.raises(CheckpointError, match="context of width 48"):
        sdjax.load(root / "base", unet=tmp_path / "unet48.safetensors")
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(CheckpointError, match="no VAE weights"):
        sdjax.load(root / "base", vae=tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no vae at"):
        sdjax.load(root / "base", vae=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        sdjax.load(root / "base", preset="fast")


def test_folder_with_missing_or_wrong_unet_config(base, tmp_path: Path) -> None:
    root, _ = base
    reference = sdjax.load(root / "base")
    missing, wrong = tmp_path / "missing", tmp_path / "wrong"
    shutil.copytree(root / "base", missing)
    (missing / "unet" / "config.json").unlink()
    (missing / "vae" / "config.json").unlink()
    shutil.copytree(root / "base", wrong)
    config = json.loads((wrong / "unet" / "config.json").read_text())
    config.update(layers_per_block=2, cross_attention_dim=768)
    (wrong / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="corrected from the weights: cross_attention_dim, layers_per_block"):
        pipe = sdjax.load(wrong)
    assert pipe.unet.config == reference.unet.config
    _assert_same(pipe.params, reference.params)
    # Without a config the shipped SD1 conventions fill in what weights cannot show (norm groups, heads): the
    # weights load, into the structure they have.
    with pytest.warns(UserWarning, match="no config.json"):
        with pytest.raises(Exception, match="norm_num_groups|groups"):
            sdjax.load(missing)
    configs = {"unet": dict(reference.unet.config.__dict__), "vae": dict(reference.vae.config.__dict__)}
    pipe = sdjax.load(missing, config=configs)
    _assert_same(pipe.params, reference.params)
