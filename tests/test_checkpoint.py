"""sdjax checkpoints (orbax) and diffusers export: exact round trips, atomic writes, no torch needed to load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sdjax
from sdjax import checkpoint
from sdjax.convert.weights import flatten
from tests.reference import tiny_pipelines


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd1") / "model"
    tiny_pipelines.save("sd1", folder, seed=3)
    return folder


def _assert_same_params(a: sdjax.Pipeline, b: sdjax.Pipeline) -> None:
    fa, fb = flatten(a.params), flatten(b.params)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = np.asarray(fa[key]), np.asarray(fb[key])
        assert x.dtype == y.dtype and np.array_equal(x, y), "/".join(key)


def test_checkpoint_round_trip_is_bit_identical(sd1_folder: Path, tmp_path: Path) -> None:
    source = sdjax.load(sd1_folder)
    out = checkpoint.save_checkpoint(source, tmp_path / "ck")
    loaded = sdjax.load(out)
    _assert_same_params(source, loaded)
    assert loaded.unet == source.unet and loaded.vae == source.vae and loaded.scheduler == source.scheduler
    ids = loaded.text_encoders["text_encoder"].tokenizer("a red circle, on blue!")["input_ids"]
    assert ids == source.text_encoders["text_encoder"].tokenizer("a red circle, on blue!")["input_ids"]


def test_checkpoint_dtype_cast(sd1_folder: Path, tmp_path: Path) -> None:
    import jax.numpy as jnp

    source = sdjax.load(sd1_folder, dtype=jnp.bfloat16)
    out = checkpoint.save_checkpoint(sdjax.load(sd1_folder), tmp_path / "ck", dtype="bfloat16")
    _assert_same_params(source, sdjax.load(out, dtype=jnp.bfloat16))


def test_existing_output_is_never_overwritten_without_force(sd1_folder: Path, tmp_path: Path) -> None:
    pipe = sdjax.load(sd1_folder)
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        checkpoint.save_checkpoint(pipe, out)
    assert (out / "keep.txt").read_text() == "mine"
    checkpoint.save_checkpoint(pipe, out, force=True)
    assert not (out / "keep.txt").exists() and checkpoint.is_sdjax_checkpoint(out)


def test_interrupted_write_leaves_nothing(sd1_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orbax.checkpoint as ocp

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(sdjax.load(sd1_folder), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_export_gives_diffusers_the_same_weights(sd1_folder: Path, tmp_path: Path) -> None:
    import diffusers

    out = checkpoint.export_diffusers(sdjax.load(sd1_folder), tmp_path / "exported")
    original = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder)
    exported = diffusers.StableDiffusionPipeline.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(exported, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"


def test_loading_needs_no_torch(sd1_folder: Path, tmp_path: Path) -> None:
    """An sdjax checkpoint and a safetensors diffusers folder both load with torch unimportable."""
    out = checkpoint.save_checkpoint(sdjax.load(sd1_folder), tmp_path / "ck")
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import sdjax\n"
        f"for path in ({str(out)!r}, {str(sd1_folder)!r}):\n"
        "    print(sorted(sdjax.load(path).params))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("text_encoder") == 2
