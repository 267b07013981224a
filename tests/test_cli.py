"""The sdjax command as a user runs it (a subprocess): A1111 file numbering, nothing overwritten, metadata that
reproduces each image, progress lines, permissions. One batch run of the default model (64x64, 3 steps) is
shared; two more runs regenerate images of it from their metadata alone."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax.parameters import parse_parameters

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a [red:blue:0.5] (circle:1.2), on blue"


def run_cli(*argv: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m sdjax.cli ARGV`` with stderr not a terminal, XLA's quick compile mode and its own hash cache."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fields(path: Path) -> dict[str, str]:
    from sdjax.images import read_parameters

    return parse_parameters(read_parameters(path) or "")


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, cache) -> tuple[Path, subprocess.CompletedProcess, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("batch") / "images"
    # Prompt editing: red for A1111's calls 0 and 1, blue for call 2 (3 steps); a weight with emphasis "No norm".
    proc = run_cli("generate", "--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", "3",
                   "--emphasis", "no_norm", "--height", "64", "--width", "64", "-n", "3", "--batch-size", "2",
                   "--seed", "5", "--sampler", "Euler a", "--guidance-rescale", "0.3", "--save-latents", "--grid",
                   "--tiling", "--out", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    return out, proc, {p.name: p.read_bytes() for p in out.iterdir()}


def test_batch_files_are_numbered_as_a1111_with_each_seed(batch_run) -> None:
    out, proc, _ = batch_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-5.npy", "00000-5.png", "00001-6.npy", "00001-6.png", "00002-7.npy", "00002-7.png",
                     "grid-00000.png"]
    for name in ("00000-5", "00001-6", "00002-7"):
        assert np.load(out / f"{name}.npy").shape == (1, 4, 8, 8)
    assert Image.open(out / "grid-00000.png").size == (192, 64)
    # Folders and files follow the umask.
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    assert stat.S_IMODE((out / "00000-5.png").stat().st_mode) == 0o666 & ~_umask()
    assert "seed 5" in proc.stdout


def test_metadata_records_every_setting(batch_run) -> None:
    from sdjax.hashes import weight_files
    from sdjax.loaders import DEFAULT_MODEL

    out, _, _ = batch_run
    fields = _fields(out / "00001-6.png")
    assert fields["Prompt"] == PROMPT and fields["Negative prompt"] == "blurry"  # verbatim, brackets and all
    assert fields["Emphasis"] == "No norm"
    assert fields["Seed"] == "6" and "Batch pos" not in fields
    assert fields["Sampler"] == "Euler a" and fields["Eta"] == "1" and fields["CFG rescale"] == "0.3"
    assert fields["Steps"] == "3" and fields["CFG scale"] == "7.5" and fields["Size"] == "64x64"
    assert fields["Tiling"] == "True"  # read back by --from-image: the regenerated pixels are equal
    digest = hashlib.sha256()
    for file in weight_files(DEFAULT_MODEL):  # the folder's weight files in path order, as documented
        digest.update(file.read_bytes())
    assert fields["Model hash"] == digest.hexdigest()[:10] and fields["Model"] == "sdjax-default"
    assert fields["Version"].startswith("sdjax ")


def test_progress_is_plain_lines_when_not_a_terminal(batch_run) -> None:
    _, proc, _ = batch_run
    err = proc.stderr
    assert "hashing and loading sdjax-default" in err and "compiling and sampling 3 image(s)" in err
    assert "batch 1/2: sampling (" in err and "batch 2/2: step 3/3" in err
    assert "\r" not in err and "Traceback" not in err


def _batch_image_is_its_seed_alone() -> bool | None:
    """Whether the generation core gives image i of seed s the noise of seed s + i alone (the lead's change);
    None where that can't be told without generating."""
    try:
        from sdjax.parallel import image_keys
    except ImportError:
        return None
    return bool(np.array_equal(np.asarray(image_keys(5, np.arange(2)))[1], np.asarray(image_keys(6, np.arange(1)))[0]))


def test_regenerate_batch_images_from_their_metadata(batch_run, cache) -> None:
    out, _, before = batch_run
    # Image 2 was its batch's first (--batch-size 2); image 1 the second image of seed 5's batch.
    for source, expected in (("00002-7.png", "00003-7.png"), ("00001-6.png", "00004-6.png")):
        proc = run_cli("generate", "--from-image", out / source, "--out", out, cache=cache)
        assert proc.returncode == 0, proc.stderr
        assert (out / expected).is_file(), sorted(p.name for p in out.iterdir())
        assert "warning" not in proc.stderr, proc.stderr
        assert _fields(out / expected) == _fields(out / source)
        diff = np.abs(_pixels(out / expected) - _pixels(out / source))
        if source == "00002-7.png":  # alone both times: the same pixels
            assert diff.max() == 0, f"{expected} differs from {source}"
            continue
        if diff.max() > 1 and _batch_image_is_its_seed_alone() is False:
            pytest.xfail("the generation core still numbers a batch's images as fold_in(seed, i), not seed + i")
        # In a batch of 2 vs alone, XLA's float sums may round differently: measured (with the core drawing
        # image i's noise from seed + i) max 1/255 on 0.024 % of the values.
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.001, (diff.max(), (diff > 0).mean())
    # Nothing was replaced.
    assert {name: (out / name).read_bytes() for name in before} == before
