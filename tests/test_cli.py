"""The sdjax command line: PNG metadata in A1111's format, clear errors, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli
from tests.reference import tiny_pipelines


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd1") / "model"
    tiny_pipelines.save("sd1", folder, seed=4)
    return folder


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_with_a1111_parameters(sd1_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "generate", "--model", str(sd1_folder), "--prompt", "a red circle",
                           "--negative-prompt", "blurry", "--steps", "3", "--guidance", "6", "-n", "2",
                           "--height", "64", "--width", "96", "--seed", "7", "--clip-skip", "1",
                           "--sampler", "dpmpp_2m", "--schedule", "karras", "--out", str(out), "--grid")
    assert code == 0
    assert "compile" in stdout and "generation" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000007-000.png", "000007-001.png", "grid.png"]
    image = Image.open(out / "000007-001.png")
    assert image.size == (96, 64)
    parameters = image.text["parameters"].split("\n")
    assert parameters[0] == "a red circle"
    assert parameters[1] == "Negative prompt: blurry"
    fields = dict(f.split(": ", 1) for f in parameters[2].split(", "))
    assert fields["Steps"] == "3" and fields["Sampler"] == "DPM++ 2M Karras" and fields["CFG scale"] == "6"
    assert fields["Seed"] == "7" and fields["Size"] == "96x64" and fields["Clip skip"] == "2"
    assert Image.open(out / "grid.png").size == (192, 64)
    # No temporary files are left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_images_do_not_depend_on_batching(sd1_folder: Path, tmp_path: Path, capsys) -> None:
    common = ["generate", "--model", str(sd1_folder), "--prompt", "a green square", "--steps", "2",
              "--height", "64", "--width", "64", "-n", "3"]
    assert _run(capsys, *common, "--out", str(tmp_path / "a"))[0] == 0
    assert _run(capsys, *common, "--batch-size", "2", "--out", str(tmp_path / "b"))[0] == 0
    for name in ("000000-000.png", "000000-002.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--height", "60", "--width", "64"], "multiple of 8"),
    (["--model", "/no/such/model"], "no model at /no/such/model"),
    (["--mask", "m.png"], "--mask needs --image"),
])
def test_bad_input_is_one_clear_error(sd1_folder: Path, tmp_path: Path, capsys, argv, message) -> None:
    args = ["generate", "--model", str(sd1_folder), "--prompt", "x", "--out", str(tmp_path / "out"), *argv]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert err.startswith("sdjax: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_image_and_mask_of_different_sizes(sd1_folder: Path, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "image.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "mask.png")
    code, _, err = _run(capsys, "generate", "--model", str(sd1_folder), "--prompt", "x", "--image",
                        str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--out",
                        str(tmp_path / "out"))
    assert code == 2 and "64x64" in err and "64x32" in err
    assert not (tmp_path / "out").exists()


def test_long_prompt_warns_how_much_was_cut(sd1_folder: Path, tmp_path: Path, capsys) -> None:
    prompt = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match=r"25 tokens longer than the 77-token limit"):
        code, _, _ = _run(capsys, "generate", "--model", str(sd1_folder), "--prompt", prompt, "--steps", "1",
                          "--height", "64", "--width", "64", "--guidance", "1", "--out", str(tmp_path / "out"))
    assert code == 0


def test_convert_and_export(sd1_folder: Path, tmp_path: Path, capsys) -> None:
    assert _run(capsys, "convert", str(sd1_folder), str(tmp_path / "ck"), "--dtype", "float16")[0] == 0
    code, _, err = _run(capsys, "convert", str(sd1_folder), str(tmp_path / "ck"))
    assert code == 2 and "already exists" in err
    assert _run(capsys, "export", str(tmp_path / "ck"), str(tmp_path / "diffusers"))[0] == 0
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    code, _, err = _run(capsys, "convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "x"))
    assert code == 2 and "missing.safetensors" in err and not (tmp_path / "x").exists()
    # A truncated single file and a file that is not a checkpoint: one message each, nothing written.
    weights = (sd1_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for name in ("cut.safetensors", "notes.ckpt"):
        code, _, err = _run(capsys, "convert", str(tmp_path / name), str(tmp_path / "y"))
        assert code == 2 and name in err and err.count("\n") == 1, err
        assert not (tmp_path / "y").exists()
