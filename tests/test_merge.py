"""Checkpoint merging (A1111's weighted sum and add difference), the single-file writer, and `sdjax merge`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sdjax
from sdjax.cli import main
from sdjax.convert.weights import flatten
from sdjax.loaders.merge import RECIPE_KEY, MergeError, save_single_file
from tests.reference import tiny_pipelines


def _flat(pipe) -> dict:
    return {k: np.asarray(v) for k, v in flatten(pipe.params).items()}


def _assert_close(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg="/".join(key))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    return {name: (tiny_pipelines.save("sd1", root / name, seed=seed), root / name)
            for name, seed in (("A", 1), ("B", 2), ("C", 3))}


def _torch_merged(models, combine, folder: Path) -> Path:
    """The merge done on the PyTorch state dicts, saved as a diffusers folder: the reference."""
    pipes = {name: pipe for name, (pipe, _) in models.items()}
    reference = tiny_pipelines.build("sd1", seed=1)
    for component in ("unet", "vae", "text_encoder"):
        states = {name: getattr(pipe, component).state_dict() for name, pipe in pipes.items()}
        merged = {k: combine(*(states[n][k] for n in "ABC")) for k in states["A"]}
        getattr(reference, component).load_state_dict(merged)
    reference.save_pretrained(folder)
    return folder


def test_weighted_sum_and_add_difference_match_merging_the_torch_weights(models, tmp_path: Path) -> None:
    a, b, c = (models[n][1] for n in "ABC")
    weighted = sdjax.merge(a, b, alpha=0.3)
    expected = _torch_merged(models, lambda x, y, z: 0.7 * x + 0.3 * y, tmp_path / "weighted")
    _assert_close(_flat(weighted), _flat(sdjax.load(expected)), atol=2e-7)
    difference = sdjax.merge(a, b, alpha=0.8, subtract=c)
    expected = _torch_merged(models, lambda x, y, z: x + (y - z) * 0.8, tmp_path / "difference")
    _assert_close(_flat(difference), _flat(sdjax.load(expected)), atol=5e-7)
    assert json.loads(difference.source) == {"method": "add_difference", "formula": "A + (B - C) * alpha",
                                             "alpha": 0.8, "A": str(a), "B": str(b), "C": str(c)}
    # alpha 0 and 1 give A and B back
    _assert_close(_flat(sdjax.merge(a, b, alpha=1.0)), _flat(sdjax.load(b)))


def test_cli_merge_writes_a_checkpoint_or_a_single_file(models, tmp_path: Path) -> None:
    import diffusers
    from safetensors import safe_open

    a, b, c = (models[n][1] for n in "ABC")
    merged = _flat(sdjax.merge(a, b, alpha=0.25, subtract=c))
    assert main(["merge", str(a), str(b), str(tmp_path / "ck"), "--alpha", "0.25", "--subtract", str(c)]) == 0
    _assert_close(_flat(sdjax.load(tmp_path / "ck")), merged)
    marker = json.loads((tmp_path / "ck" / "sdjax_model.json").read_text())
    assert marker[RECIPE_KEY]["method"] == "add_difference" and marker[RECIPE_KEY]["alpha"] == 0.25

    file = tmp_path / "merged.safetensors"
    assert main(["merge", str(a), str(b), str(file), "--alpha", "0.25", "--subtract", str(c),
                 "--format", "safetensors"]) == 0
    _assert_close(_flat(sdjax.load(file, config=a)), merged)
    with safe_open(str(file), "np") as f:
        assert json.loads(f.metadata()[RECIPE_KEY])["C"] == str(c)
    assert main(["merge", str(a), str(b), str(file), "--alpha", "0.5", "--format", "safetensors"]) == 2  # exists
    # diffusers' own single-file reader takes the file too
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(a), local_files_only=True,
                                                              safety_checker=None)
    ours = sdjax.load(file, config=a)
    kernel = ours.params["unet"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(pipe.unet.conv_in.weight.detach().numpy(), np.asarray(kernel).transpose(3, 2, 0, 1))


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_single_file_writer_round_trips(kind: str, tmp_path: Path) -> None:
    """OpenCLIP towers (SD 2.x's, with the extra 24th-style block; SDXL's bigG with projection) and both SDXL
    encoders go back to the original layout and read back unchanged."""
    tiny_pipelines.save(kind, tmp_path / "folder", seed=4)
    pipe = sdjax.load(tmp_path / "folder")
    file = save_single_file(pipe, tmp_path / "model.safetensors")
    _assert_close(_flat(sdjax.load(file, config=tmp_path / "folder")), _flat(pipe))


def test_different_architectures_are_refused(models, tmp_path: Path) -> None:
    a = models["A"][1]
    tiny_pipelines.save("sd1_inpaint", tmp_path / "inpaint", seed=5)
    with pytest.raises(MergeError, match=r"unet differs.*conv_in/kernel.*in_channels 4 vs 9"):
        sdjax.merge(a, tmp_path / "inpaint", alpha=0.5)
    tiny_pipelines.save("sdxl", tmp_path / "xl", seed=6)
    with pytest.raises(MergeError, match="different components"):
        sdjax.merge(a, models["B"][1], alpha=0.5, subtract=tmp_path / "xl")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        sdjax.merge(a, a, alpha=float("nan"))
    assert main(["merge", str(a), str(tmp_path / "nothing"), str(tmp_path / "out"), "--alpha", "0.5"]) == 2
    assert not (tmp_path / "out").exists()
