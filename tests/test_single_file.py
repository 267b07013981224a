"""convert/single_file.py against tiny diffusers/transformers models, and the writer against diffusers itself.

Every tiny model has random values in every weight, so a misplaced, transposed or dropped tensor cannot pass the
exact comparisons.
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from sdjax.convert.safe_load import CheckpointError, read_state_dict
from sdjax.convert.single_file import (
    CLIP_TOKENIZER,
    FAMILIES,
    OPENCLIP_TOKENIZER,
    config_dir,
    detect_family,
    load_single_file,
    split_single_file,
)
from tests.reference.single_file_writer import (
    save_single_file,
    single_file_state_dict,
    tiny_models,
    write_config_folder,
)

_PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd1_inpaint": "StableDiffusionInpaintPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd2_inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl_inpaint": "StableDiffusionXLInpaintPipeline",
    "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline",
}
_TOKENIZERS = {
    "sd1": {"text_encoder": CLIP_TOKENIZER},
    "sd2": {"text_encoder": OPENCLIP_TOKENIZER},
    "sdxl": {"text_encoder": CLIP_TOKENIZER, "text_encoder_2": OPENCLIP_TOKENIZER},
    "sdxl_refiner": {"text_encoder_2": OPENCLIP_TOKENIZER},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("single_file")


@cache
def _tiny(family: str) -> dict[str, torch.nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns about the tiny vocabulary's special-token ids
        return tiny_models(family, seed=sorted(FAMILIES).index(family) * 10)


def _written(workdir: Path, family: str, suffix: str, global_step: int | None = None) -> tuple[Path, Path]:
    """The tiny family's single file (written once per suffix/step) and its diffusers-style config folder."""
    models = _tiny(family)
    folder = workdir / family / "config"
    if not folder.exists():
        write_config_folder(models, folder, config_dir(family))
    path = workdir / family / f"model-{global_step}{suffix}"
    if not path.exists():
        save_single_file(single_file_state_dict(family, **models), path, global_step=global_step)
    return path, folder


def _with_text_model(name: str, state: dict) -> dict:
    """CLIP keys with ``text_model.``, as checkpoints have them (transformers >= 5.6 dropped it from CLIPTextModel)."""
    if not name.startswith("text_encoder"):
        return state
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()}


def _reference(name: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in _with_text_model(name, model.state_dict()).items()}


def _assert_components_equal(components: dict[str, dict[str, np.ndarray]], models: dict[str, torch.nn.Module]) -> None:
    assert set(components) == set(models)
    for name, model in models.items():
        expected, got = _reference(name, model), components[name]
        assert set(got) == set(expected), f"{name}: {sorted(set(got) ^ set(expected))[:8]}"
        for key, value in expected.items():
            assert got[key].shape == value.shape, f"{name}.{key}"
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")


def _tiny_configs(family: str) -> dict[str, dict]:
    """The tiny models' configs as dicts, without a scheduler (so the prediction-type rules apply)."""
    return {
        name: model.config.to_dict() if name.startswith("text_encoder") else dict(model.config)
        for name, model in _tiny(family).items()
    }


# --- round trip: writer -> file -> read_state_dict -> split_single_file ------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_recovers_every_weight(workdir: Path, family: str, suffix: str) -> None:
    path, folder = _written(workdir, family, suffix)
    state_dict = read_state_dict(path)
    assert detect_family(state_dict) == family
    model = split_single_file(state_dict, configs=folder)
    assert model.family == family
    _assert_components_equal(model.components, _tiny(family))
    assert model.tokenizers == _TOKENIZERS[family.removesuffix("_inpaint")]
    assert model.configs["unet"]["in_channels"] == (9 if "inpaint" in family else 4)
    assert set(model.configs) == {"unet", "vae", *model.tokenizers}


def test_bf16_file_keeps_dtype_and_values(workdir: Path) -> None:
    models = _tiny("sdxl")
    state = {
        k: v.bfloat16() if v.is_floating_point() else v for k, v in single_file_state_dict("sdxl", **models).items()
    }
    path = workdir / "sdxl-bf16.safetensors"
    save_single_file(state, path)
    model = split_single_file(read_state_dict(path), configs=_written(workdir, "sdxl", ".safetensors")[1])
    for name, module in models.items():
        for key, value in _reference(name, module).items():
            got = model.components[name][key]
            assert got.dtype == ml_dtypes.bfloat16, key
            expected = torch.from_numpy(value).bfloat16().float().numpy()
            np.testing.assert_array_equal(got.astype(np.float32), expected, err_msg=key)


# --- the writer against diffusers' own loader ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_from_single_file_reads_the_writer_output(workdir: Path, family: str, suffix: str) -> None:
    """diffusers 0.42's from_single_file, offline, with a local config folder (no original_config needed)."""
    import diffusers

    path, folder = _written(workdir, family, suffix)
    tokenizers = {"tokenizer": None, "tokenizer_2": None} if family.startswith("sdxl") else {"tokenizer": None}
    pipeline_class = getattr(diffusers, _PIPELINES[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline_class.from_single_file(str(path), config=str(folder), local_files_only=True, **tokenizers)
    for name, model in _tiny(family).items():
        expected, got = model.state_dict(), getattr(pipe, name).state_dict()
        assert set(got) == set(expected), name
        mismatched = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not mismatched, f"{name}: {mismatched[:5]}"


# --- family detection ------------------------------------------------------------------------------------------------


def _fake(keys: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, np.float16) for k, shape in keys.items()}


_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"


@pytest.mark.parametrize(
    ("context_dim", "label_emb", "family"),
    [(768, False, "sd1"), (1024, False, "sd2"), (2048, True, "sdxl"), (1280, True, "sdxl_refiner")],
)
def test_family_from_unet_alone(context_dim: int, label_emb: bool, family: str) -> None:
    """Files without text encoders are named by the UNet's cross-attention width."""
    keys = {_CONV_IN: (320, 4, 3, 3), _TO_K: (320, context_dim)}
    if label_emb:
        keys[_LABEL_EMB] = (1280, 2816)
    assert detect_family(_fake(keys)) == family


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, r"no Stable Diffusion UNet.*first_stage_model"),
        ({"transformer.blocks.0.weight": (8, 8)}, r"no Stable Diffusion UNet.*transformer.blocks"),
        ({_CONV_IN: (320, 8, 3, 3), "cond_stage_model.transformer.x": (1,)}, r"input conv takes 8 channels"),
        ({_CONV_IN: (320, 4, 3, 3), _TO_K: (320, 512)}, r"cross-attention width of 512"),
        (
            {
                _CONV_IN: (320, 4, 3, 3),
                "conditioner.embedders.0.transformer.x": (1,),
                "conditioner.embedders.1.model.x": (1,),
            },
            r"look like sdxl, but the UNet lacks",
        ),
        ({_CONV_IN: (320, 9, 3, 3), _LABEL_EMB: (1, 1), "conditioner.embedders.0.model.x": (1,)}, r"9 channels"),
    ],
    ids=["vae-only", "not-sd", "pix2pix-8-channels", "unknown-context", "sdxl-without-label-emb", "refiner-inpaint"],
)
def test_unknown_architecture(keys: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match="unknown architecture") as error:
        detect_family(_fake(keys))
    assert error.match(message)


# --- prediction type and scheduler ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("global_step", "prediction", "config_name", "scheduler"),
    [(None, "v_prediction", "sd2_v", "DDIMScheduler"), (875000, "epsilon", "sd2", "PNDMScheduler")],
)
def test_sd2_prediction_type_heuristic(workdir: Path, global_step, prediction, config_name, scheduler) -> None:
    """As diffusers: SD 2.x is 768-v unless the file's global_step is the 512-base run's 875000."""
    path, _ = _written(workdir, "sd2", ".ckpt", global_step=global_step)
    model = load_single_file(path, configs=_tiny_configs("sd2"))
    assert model.scheduler_config["prediction_type"] == prediction
    assert model.config_name == config_name
    assert model.scheduler_config["_class_name"] == scheduler
    assert json.loads((config_dir(config_name) / "unet" / "config.json").read_text())["sample_size"] == (
        96 if prediction == "v_prediction" else 64
    )


@pytest.mark.parametrize(
    ("family", "prediction_type"), [("sd1", "v_prediction"), ("sd2", "epsilon"), ("sdxl", "v_prediction")]
)
def test_explicit_prediction_type_wins(workdir: Path, family: str, prediction_type: str) -> None:
    path, folder = _written(workdir, family, ".safetensors")
    model = split_single_file(read_state_dict(path), configs=folder, prediction_type=prediction_type)
    assert model.scheduler_config["prediction_type"] == prediction_type
    default = split_single_file(read_state_dict(path), configs=_tiny_configs(family))
    assert default.scheduler_config["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")


def test_bad_prediction_type(workdir: Path) -> None:
    path, folder = _written(workdir, "sd1", ".safetensors")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        split_single_file(read_state_dict(path), configs=folder, prediction_type="v")


# --- mismatches between file and config --------------------------------------------------------------------------


def test_unet_config_that_does_not_match_the_file(workdir: Path) -> None:
    path, _ = _written(workdir, "sd1", ".safetensors")
    configs = _tiny_configs("sd1")
    configs["unet"]["layers_per_block"] = 2  # the file has one resnet per level
    with pytest.raises(CheckpointError, match=r"UNet weights do not match the UNet config.*no place.*absent"):
        split_single_file(read_state_dict(path), configs=configs)


def test_text_encoder_missing_a_layer(workdir: Path) -> None:
    path, _ = _written(workdir, "sdxl", ".safetensors")
    state_dict = {k: v for k, v in read_state_dict(path).items() if ".resblocks.2." not in k}
    with pytest.raises(CheckpointError, match=r"OpenCLIP text encoder does not match.*missing.*layers\.2\."):
        split_single_file(state_dict, configs=_tiny_configs("sdxl"))


def test_component_absent_from_the_file_is_left_out(workdir: Path) -> None:
    path, folder = _written(workdir, "sd1", ".safetensors")
    state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith("first_stage_model.")}
    model = split_single_file(state_dict, configs=folder)
    assert set(model.components) == {"unet", "text_encoder"}
    assert "vae" in model.configs  # the config is still there for a VAE loaded from elsewhere


# --- shipped configs -------------------------------------------------------------------------------------------------

_UNET_PARAMS = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684, "sdxl_refiner": 2_259_526_660}
_INPAINT_EXTRA = 5 * 320 * 3 * 3  # five more input channels into conv_in
_VAE_PARAMS = 83_653_863
_TEXT_PARAMS = {"clip-l": 123_060_480, "openclip-h-23": 340_387_840, "bigg": 694_659_840}
_TEXT_ENCODERS = {"sd1": ["clip-l"], "sd2": ["openclip-h-23"], "sdxl": ["clip-l", "bigg"], "sdxl_refiner": ["bigg"]}


@cache
def _shape_only_models(name: str) -> dict[str, torch.nn.Module]:
    """The real-size models of a shipped config folder, on the meta device (shapes, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_dir(name)
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text())),
            "vae": AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text())),
        }
        for component, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / component).is_dir():
                models[component] = cls(CLIPTextConfig.from_pretrained(folder / component))
    return models


@pytest.mark.parametrize("name", [*FAMILIES, "sd2_v"])
def test_shipped_configs_build_the_published_models(name: str) -> None:
    """Parameter counts of the published models, from the shipped configs."""
    base = name.removesuffix("_inpaint").removesuffix("_v")
    counts = {component: sum(p.numel() for p in m.parameters()) for component, m in _shape_only_models(name).items()}
    assert counts.pop("unet") == _UNET_PARAMS[base] + (_INPAINT_EXTRA if name.endswith("_inpaint") else 0)
    assert counts.pop("vae") == _VAE_PARAMS
    assert [counts[c] for c in sorted(counts)] == [_TEXT_PARAMS[t] for t in _TEXT_ENCODERS[base]]

    folder = config_dir(name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == _PIPELINES.get(name, "StableDiffusionPipeline")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler.get("prediction_type", "epsilon") == ("v_prediction" if name == "sd2_v" else "epsilon")


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_layout_splits_with_the_shipped_configs(family: str) -> None:
    """A shape-only file in the real models' layout (SD 2.x: 24 resblocks, SDXL: 10-deep transformers) splits,
    with no configs passed, into exactly the real diffusers models' keys and shapes."""
    models = _shape_only_models(family)
    zero = np.zeros((), np.float16)
    written = single_file_state_dict(family, **models)
    state_dict = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in written.items()}  # no memory per tensor
    model = split_single_file(state_dict)
    assert model.family == family
    assert model.config_name == ("sd2_v" if family == "sd2" else family)
    for name, module in models.items():
        expected = {k: tuple(v.shape) for k, v in _with_text_model(name, module.state_dict()).items()}
        assert {k: tuple(v.shape) for k, v in model.components[name].items()} == expected, name
