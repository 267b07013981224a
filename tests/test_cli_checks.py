"""The command line's checks before any work, and its small parts (sampler names, A1111 parameters, resize
modes, the memory estimate, help texts). No image is generated here: the bad-input cases run with model loading
and the generation core replaced by a stub that fails the test, which proves the message comes first."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli, memory
from sdjax.images import RESIZE_MODES, mask_warnings, nearest_multiple, resize_image
from sdjax.parameters import format_parameters, parse_parameters
from sdjax.samplers.names import a1111_name, resolve_sampler

ROOT = Path(__file__).resolve().parent.parent


class Loaded(Exception):
    """Raised by the stubbed loader: the command got past its checks."""


@pytest.fixture
def no_work(monkeypatch):
    """Loading or generating anything fails the check under test."""
    import functools

    import sdjax.generation.host
    import sdjax.loaders

    for module, name in ((sdjax.loaders, "load"), (sdjax.generation.host, "run")):
        @functools.wraps(getattr(module, name))  # keeps the signature, which the CLI inspects
        def loaded(*args, **kwargs):
            raise Loaded

        monkeypatch.setattr(module, name, loaded)


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory) -> Path:
    from tests.reference import tiny_pipelines

    folder = tmp_path_factory.mktemp("inpaint") / "model"
    tiny_pipelines.save("sd1_inpaint", folder, seed=1)
    return folder


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))  # the hash cache


def _main(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _file(tmp_path: Path, name: str = "file") -> Path:
    (tmp_path / name).write_text("x")
    return tmp_path / name


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["-n", "0"], "-n must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eta", "-0.5"], "--eta must be >= 0"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1]"),
    (["--guidance-rescale", "-0.1"], "--guidance-rescale must be in [0, 1]"),
    (["--seed", str(2**32)], "--seed must be -1 (random) or in [0, 2**32)"),
    (["--seed", str(10**20)], "--seed must be -1 (random) or in [0, 2**32)"),
    (["--seed", "-2"], "--seed must be -1 (random)"),
    (["--seed", str(2**32 - 1), "-n", "2"], "pass 2**32 - 1"),
    (["--height", "60", "--width", "64"], "--height 60: must be a positive multiple of 8"),
    (["--height", "64"], "give both --height and --width"),
    (["--height", "20000", "--width", "64", "--format", "webp"], "--format webp stores at most 16383"),
    (["--height", "65536", "--width", "65536"], "lower --height/--width or --batch-size"),
    (["--height", "4096", "--width", "4096", "-n", "1000"], "available"),
    (["--sampler", "Eular a"], "did you mean 'Euler a'?"),
    (["--sampler", "DPM++ 2M Karras", "--schedule", "exponential"], "means the karras schedule"),
    (["--sampler", "ddim", "--schedule", "karras"], "sampler ddim has only default"),
    (["--mask", "m.png"], "--mask needs --image"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--lora", "/no/such.safetensors:0.5"], "--lora '/no/such.safetensors' does not exist"),
    (["--embedding", "/no/such.pt"], "--embedding '/no/such.pt' does not exist"),
    (["--model", "/no/such/model"], "--model '/no/such/model' does not exist"),
    (["--refiner", "/no/such/refiner"], "--refiner '/no/such/refiner' does not exist"),
    (["--devices", "0"], "--devices must be at least 1"),
    (["--devices", "4096"], "--devices 4096: only"),
    (["--clip-skip", "-1"], "--clip-skip must be >= 0"),
    (["--hires-strength", "0.5"], "--hires-strength needs --hires-scale"),
    (["--hires-upscaler", "Latent"], "--hires-upscaler needs --hires-scale"),
    (["--hires-scale", "0.5"], "--hires-scale must be a number >= 1"),
    (["--hires-scale", "2", "--hires-strength", "1.5"], "--hires-strength must be in (0, 1]"),
    (["--hires-scale", "2", "--hires-steps", "-1"], "--hires-steps must be a non-negative integer"),
    (["--hires-scale", "2", "--hires-upscaler", "ESRGAN_4x"], "--hires-upscaler 'ESRGAN_4x' is unknown"),
    (["--hires-scale", "2", "--hires-strength", "0.001"], "--hires-strength 0.001 with 30 hires steps needs a"),
    (["--hires-scale", "2", "--image", "in.png"], "--hires-scale works with text-to-image only"),
    (["--hires-scale", "300", "--height", "64", "--width", "64", "--format", "webp"], "the hires height 19200"),
    (["--hires-scale", "200", "--height", "512", "--width", "512"], "--hires-scale 200: --height 102400"),
    (["--hires-scale", "2", "--hires-strength", "0.01", "--steps", "20"], "a schedule of 2000 steps"),
    (["--prompt", "a <lora:ink:0.5>"], "--prompt: the prompt has <lora:ink>: give --lora-dir"),
    (["--prompt", "a <hypernet:anime>"], "give --hypernetwork-dir"),
    (["--prompt", "a <lora:ink>", "--lora-dir", "/no/such/folder"], "--lora-dir '/no/such/folder' is not a folder"),
    (["--prompt", "a <lyco:ink>"], "<lora:...> and <hypernet:...> tags only"),
])
def test_bad_values_are_one_message_naming_the_option(no_work, tmp_path, capsys, argv, message) -> None:
    code, err = _main(capsys, "generate", "--prompt", "x", "--out", str(tmp_path / "out"), *argv)
    assert code == 2, err
    assert err.startswith("sdjax: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_folders_and_files(no_work, tmp_path, capsys) -> None:
    blocker = _file(tmp_path, "blocker")
    code, err = _main(capsys, "generate", "--prompt", "x", "--out", str(blocker / "sub" / "out"))
    assert code == 2 and "--out" in err and "is a file, not a folder" in err, err
    code, err = _main(capsys, "generate", "--prompt", "x", "--out", str(blocker))
    assert code == 2 and "exists and is not a folder" in err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = _main(capsys, "generate", "--prompt", "x", "--out", str(locked / "out"))
        assert code == 2 and "is not writable" in err
    code, err = _main(capsys, "generate", "--prompt", "x", "--image", str(blocker), "--out", str(tmp_path / "o"))
    assert code == 2 and "--image" in err and "not a readable image" in err
    code, err = _main(capsys, "generate", "--out", str(tmp_path / "o"))
    assert code == 2 and "--prompt is required" in err


@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2**32)], "--seed must be -1 (random) or in [0, 2**32)"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--height", "65536", "--width", "65536"], "needs at least"),
    (["--sampler", "dpm++ 2m karas"], "did you mean 'DPM++ 2M Karras'?"),
    (["--out", "{file}/out"], "is a file, not a folder"),
])
def test_bad_input_through_the_command(tmp_path, argv, message) -> None:
    """As a user runs it: exit status 2, one line, nothing loaded or written."""
    argv = [a.replace("{file}", str(_file(tmp_path, "taken"))) for a in argv]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--prompt", "x", "--out", str(out), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["taken"])


def test_unwritable_output_folder_subprocess(tmp_path) -> None:
    """As a user runs it: a permission problem is found before the model loads."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    proc = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.access = lambda *a, **k: False; from sdjax import cli; "
                               "sys.exit(cli.main(sys.argv[1:]))",
         "generate", "--prompt", "x", "--out", str(locked / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--out" in proc.stderr and "is not writable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr


def test_inpainting_model_needs_a_mask(no_work, inpaint_folder, tmp_path, capsys) -> None:
    code, err = _main(capsys, "generate", "--model", str(inpaint_folder), "--prompt", "x", "--out",
                      str(tmp_path / "o"))
    assert code == 2 and "--mask" in err and "inpainting model (9-channel UNet)" in err, err


def test_refiner_needs_an_sdxl_base(no_work, inpaint_folder, tmp_path, capsys) -> None:
    code, err = _main(capsys, "generate", "--model", str(inpaint_folder), "--refiner", str(inpaint_folder),
                      "--prompt", "x", "--mask", "m", "--out", str(tmp_path / "o"))
    assert code == 2 and "--mask needs --image" in err
    code, err = _main(capsys, "generate", "--refiner", str(inpaint_folder), "--refiner-switch", "1.2",
                      "--prompt", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "--refiner-switch must be in (0, 1)" in err
    code, err = _main(capsys, "generate", "--refiner", str(inpaint_folder), "--prompt", "x", "--out",
                      str(tmp_path / "o"))
    assert code == 2 and "--refiner needs an SDXL base" in err


def test_input_images_are_resized_with_a_notice_and_masks_checked(no_work, tmp_path, capsys) -> None:
    Image.new("RGB", (60, 44), "red").save(tmp_path / "in.png")
    Image.new("RGB", (60, 44), "blue").save(tmp_path / "mask.png")  # colour, and all dark once grey
    with pytest.raises(Loaded):
        cli.main(["generate", "--prompt", "x", "--image", str(tmp_path / "in.png"), "--mask",
                  str(tmp_path / "mask.png"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "--image is 60x44, not a multiple of 8: resized to 64x48" in err
    assert "--mask has colour" in err and "--mask is all black: nothing will be repainted" in err
    Image.new("L", (60, 44), 255).save(tmp_path / "white.png")
    with pytest.raises(Loaded):
        cli.main(["generate", "--prompt", "x", "--image", str(tmp_path / "in.png"), "--mask",
                  str(tmp_path / "white.png"), "--width", "64", "--height", "64", "--out", str(tmp_path / "o")])
    assert "is all white" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_vae_option_reaches_the_loader(no_work, tmp_path, monkeypatch) -> None:
    import sdjax.loaders

    seen = {}

    def loading(model, **options):
        seen.update(options)
        raise Loaded

    monkeypatch.setattr(sdjax.loaders, "load", loading)
    vae = _file(tmp_path, "vae.safetensors")
    with pytest.raises(Loaded):  # every check passed; the loader is called with vae=
        cli.main(["generate", "--prompt", "x", "--vae", str(vae), "--out", str(tmp_path / "o")])
    assert seen["vae"] == str(vae)


# --- sampler names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("Euler a", ("euler_a", None)), ("euler A", ("euler_a", None)), ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("dpm++ 2m  karras", ("dpmpp_2m", "karras")), ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")),
    ("PLMS", ("pndm", None)), ("UniPC", ("unipc", None)), ("dpmpp_2m", ("dpmpp_2m", None)), ("DDPM", ("ddpm", None)),
])
def test_a1111_sampler_names(name, expected) -> None:
    assert resolve_sampler(name) == expected
    sampler, schedule = expected
    assert resolve_sampler(a1111_name(sampler, schedule)) == (sampler, schedule)


def test_unknown_sampler_suggests_the_nearest() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'DPM 2M Karras'; did you mean 'DPM\+\+ 2M Karras'\?"):
        resolve_sampler("DPM 2M Karras")
    with pytest.raises(ValueError, match="unknown sampler 'zzz' \\(valid: euler"):
        resolve_sampler("zzz")


# --- A1111 parameters ---------------------------------------------------------------------------------------

def test_parameters_round_trip_as_a1111_writes_them() -> None:
    text = format_parameters("a cat,\nin a hat", "blurry: bad", {"Steps": 20, "Sampler": "Euler a", "Seed": 7,
                             "Size": "64x48", "Lora hashes": "a: 0123456789, b: 9876543210", "Skipped": None},
                             {"Guidance": "apg"})
    assert text.split("\n")[-1] == ('Steps: 20, Sampler: Euler a, Seed: 7, Size: 64x48, '
                                    'Lora hashes: "a: 0123456789, b: 9876543210", Guidance: apg')
    assert parse_parameters(text) == {"Prompt": "a cat,\nin a hat", "Negative prompt": "blurry: bad", "Steps": "20",
                                      "Sampler": "Euler a", "Seed": "7", "Size": "64x48",
                                      "Lora hashes": "a: 0123456789, b: 9876543210", "Guidance": "apg"}
    # A1111's own text, as its web UI writes it.
    a1111 = ("masterpiece, a castle\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, "
             "CFG scale: 6.5, Seed: 3916412014, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, "
             "Denoising strength: 0.55, Clip skip: 2, Version: v1.10.1")
    fields = parse_parameters(a1111)
    assert fields["Prompt"] == "masterpiece, a castle" and fields["Negative prompt"] == "lowres"
    assert fields["Schedule type"] == "Karras" and fields["Seed"] == "3916412014" and fields["Clip skip"] == "2"
    assert parse_parameters("only a prompt, no settings") == {"Prompt": "only a prompt, no settings",
                                                             "Negative prompt": ""}


def test_from_image_reads_a1111_metadata(tmp_path) -> None:
    from sdjax.images import save_image

    text = ("a castle\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, "
            "Seed: 3916412014, Size: 512x768, Denoising strength: 0.55, Clip skip: 2, CFG rescale: 0.7, Eta: 0.3")
    for suffix in ("png", "jpg", "webp"):
        save_image(Image.new("RGB", (16, 16)), tmp_path / f"a.{suffix}", text)
        got = cli.defaults_from_image(str(tmp_path / f"a.{suffix}"))
        got.pop("from_image_fields")
        assert got == {"prompt": "a castle", "negative_prompt": "lowres", "steps": 28, "guidance": 6.5,
                       "seed": 3916412014, "width": 512, "height": 768, "sampler": "dpmpp_2m", "schedule": "karras",
                       "strength": 0.55, "clip_skip": 1, "guidance_rescale": 0.7, "eta": 0.3}, suffix
    save_image(Image.new("RGB", (16, 16)), tmp_path / "plain.png")
    with pytest.raises(cli.UsageError, match="has no A1111 parameters"):
        cli.defaults_from_image(str(tmp_path / "plain.png"))


# --- images ---------------------------------------------------------------------------------------------------

def _gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_resize_modes_as_a1111(mode) -> None:
    wide = _gradient(100, 50)
    out = resize_image(wide, 64, 64, mode)
    assert out.size == (64, 64)
    a = np.asarray(out, np.int16)
    if mode == "just-resize":
        np.testing.assert_array_equal(a, np.asarray(wide.resize((64, 64), Image.Resampling.LANCZOS), np.int16))
    elif mode == "crop":  # scaled to 128x64, the middle 64 columns kept
        middle = np.asarray(wide.resize((128, 64), Image.Resampling.LANCZOS), np.int16)[:, 32:96]
        np.testing.assert_array_equal(a, middle)
    else:  # scaled to 64x32 in the middle, the 16 rows above and below stretched from its edge rows
        inner = np.asarray(wide.resize((64, 32), Image.Resampling.LANCZOS), np.int16)
        np.testing.assert_array_equal(a[16:48], inner)
        assert np.abs(a[:16] - inner[:1]).max() <= 2 and np.abs(a[48:] - inner[-1:]).max() <= 2
    assert nearest_multiple((60, 44), 8) == (64, 48) and nearest_multiple((3, 67), 8) == (8, 64)


def test_mask_warnings() -> None:
    grey = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
    assert mask_warnings(grey) == []
    assert mask_warnings(grey.convert("RGB")) == []  # grey stored as RGB is not colour
    assert mask_warnings(Image.new("L", (8, 8), 0)) == ["is all black: nothing will be repainted"]


# --- the memory estimate ------------------------------------------------------------------------------------

def test_memory_estimate_is_a_lower_bound_that_scales() -> None:
    sd = memory.estimate_bytes(None, 1, 512, 512)
    # VAE decoder at 512x512: (128 + 256) channels x 4 bytes; the UNet term (latent 64x64) is smaller.
    assert sd == (128 + 256) * 512 * 512 * 4
    assert memory.estimate_bytes(None, 4, 512, 512) == 4 * sd
    assert memory.estimate_bytes(None, 4, 512, 512, devices=4) == sd
    assert memory.estimate_bytes({"params_bytes": 10}, 1, 512, 512) == sd + 10
    assert memory.estimate_bytes(None, 1, 65536, 65536) > 2 * 2**40  # what XLA asked 1.9 TB for
    assert memory.available_bytes() is None or memory.available_bytes() > 0
    # A loaded pipeline: its params' bytes plus its own channel counts.
    import jax

    import sdjax

    pipe = sdjax.load()
    configs = {"unet": {"block_out_channels": pipe.unet.config.block_out_channels},
               "vae": {"block_out_channels": pipe.vae.config.block_out_channels},
               "params_bytes": sum(x.nbytes for x in jax.tree.leaves(pipe.params))}
    assert memory.estimate_bytes(pipe, 2, 64, 96) == memory.estimate_bytes(configs, 2, 64, 96) > configs["params_bytes"]


# --- help -----------------------------------------------------------------------------------------------------

def test_every_option_has_help_showing_its_default() -> None:
    import argparse

    parser = cli._build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("sdjax", parser), *subparsers.choices.items()]:
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions)
                continue
            assert action.help, (name, action.dest)
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction, cli._ListSamplers)):
                text = formatter._get_help_string(action) or ""
                assert not action.option_strings or "default" in text or "required" in text, (name, action.dest)
        assert "(default: 30)" in sub.format_help() or name != "generate"


def test_version_and_list_samplers(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("sdjax ")
    proc = subprocess.run([sys.executable, "-m", "sdjax.cli", "--list-samplers"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "DPM++ 2M Karras" in proc.stdout and "euler_a" in proc.stdout


def test_umask_mode(tmp_path) -> None:
    from sdjax.images import save_image

    old = os.umask(0o027)
    try:
        save_image(Image.new("RGB", (8, 8)), tmp_path / "new" / "x.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "new" / "x.png").stat().st_mode) == 0o640
    with pytest.raises(FileExistsError):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "new" / "x.png")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["x.png"]


# --- convert / export and the prompt-length warning (in-process: these load a model) --------------------------

@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory) -> Path:
    from tests.reference import tiny_pipelines

    folder = tmp_path_factory.mktemp("sd1") / "model"
    tiny_pipelines.save("sd1", folder, seed=4)
    return folder


def test_image_and_mask_of_different_sizes(no_work, tmp_path, capsys) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "image.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "mask.png")
    code, err = _main(capsys, "generate", "--prompt", "x", "--image", str(tmp_path / "image.png"), "--mask",
                      str(tmp_path / "mask.png"), "--out", str(tmp_path / "out"))
    assert code == 2 and "64x64" in err and "64x32" in err
    assert not (tmp_path / "out").exists()


def test_long_prompt_is_encoded_in_chunks_without_a_warning(sd1_folder, tmp_path, capsys, fast_compile) -> None:
    import warnings

    prompt = " ".join(["red"] * 100)  # 100 tokens: two 75-token chunks, as A1111 (no cut, no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        code, _ = _main(capsys, "generate", "--model", str(sd1_folder), "--prompt", prompt, "--steps", "1",
                        "--height", "64", "--width", "64", "--guidance", "1", "--out", str(tmp_path / "out"))
    assert code == 0


def test_convert_and_export(sd1_folder, tmp_path, capsys) -> None:
    assert _main(capsys, "convert", str(sd1_folder), str(tmp_path / "ck"), "--dtype", "float16")[0] == 0
    code, err = _main(capsys, "convert", str(sd1_folder), str(tmp_path / "ck"))
    assert code == 2 and "already exists" in err
    assert _main(capsys, "export", str(tmp_path / "ck"), str(tmp_path / "diffusers"))[0] == 0
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    code, err = _main(capsys, "convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "x"))
    assert code == 2 and "missing.safetensors" in err and not (tmp_path / "x").exists()
    code, err = _main(capsys, "convert", str(sd1_folder), str(_file(tmp_path, "f") / "ck"))
    assert code == 2 and "OUT" in err and "is a file, not a folder" in err
    # A truncated single file and a file that is not a checkpoint: one message each, nothing written.
    weights = (sd1_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for name in ("cut.safetensors", "notes.ckpt"):
        code, err = _main(capsys, "convert", str(tmp_path / name), str(tmp_path / "y"))
        lines = err.strip().splitlines()  # progress notes ("sdjax: loading ..."), then the one error
        assert code == 2 and lines[-1].startswith("sdjax: error:") and name in lines[-1], err
        assert sum("error" in line for line in lines) == 1 and "Traceback" not in err
        assert not (tmp_path / "y").exists()


def test_progress_lines_count_from_the_first_step_run(capsys) -> None:
    progress = cli.Progress(30, 2, interval=1e9)  # stderr is captured here: not a terminal
    for _ in range(2):
        progress.begin_batch()
        for step in range(13, 31):  # image-to-image at strength 0.6 runs steps 13..30
            progress(step, 30)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("sdjax: batch 1/2: sampling (") and "s to compile" in lines[0]
    # Between the periodic lines (none in this short run), each batch's last step is always shown.
    assert lines[1].startswith("sdjax: batch 1/2: step 30/30, ") and lines[1].endswith(" s/step")
    assert lines[2].startswith("sdjax: batch 2/2: step 30/30, ") and len(lines) == 3
