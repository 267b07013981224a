"""convert/safe_load.py: safetensors without torch, weights-only pickles, clear errors for everything else."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdjax.convert.safe_load import CheckpointError, read_checkpoint, read_state_dict


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(4, 2, generator=gen).half(),
        "bf16": torch.randn(2, 3, 7, generator=gen).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5),
    }


def _assert_same(arrays: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> None:
    assert set(arrays) == set(tensors)
    for key, tensor in tensors.items():
        array = arrays[key]
        assert array.shape == tuple(tensor.shape), key
        expected_dtype = ml_dtypes.bfloat16 if tensor.dtype == torch.bfloat16 else tensor.numpy().dtype
        assert array.dtype == expected_dtype, key
        np.testing.assert_array_equal(array.astype(np.float64), tensor.double().numpy(), err_msg=key)


# --- safetensors ---------------------------------------------------------------------------------------------------


def test_safetensors_fp32_fp16_bf16(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    checkpoint = read_checkpoint(path)
    _assert_same(checkpoint.state_dict, tensors)
    assert checkpoint.metadata == {"format": "pt"}
    assert checkpoint.global_step is None


def test_safetensors_needs_no_torch(tmp_path: Path) -> None:
    """In a process where ``import torch`` fails, safetensors still load, and pickles get a clear error."""
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": tensors}, tmp_path / "model.ckpt")
    expected = {k: v.double().numpy().tolist() for k, v in tensors.items()}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = f"""
import json, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import numpy as np
from sdjax.convert.safe_load import CheckpointError, read_state_dict
expected = json.load(open({str(tmp_path / "expected.json")!r}))
arrays = read_state_dict({str(tmp_path / "model.safetensors")!r})
for key, values in expected.items():
    assert np.array_equal(arrays[key].astype(np.float64), np.array(values)), key
print("dtypes", sorted(str(a.dtype) for a in arrays.values()))
try:
    read_state_dict({str(tmp_path / "model.ckpt")!r})
except CheckpointError as e:
    print("error", e)
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "dtypes ['bfloat16', 'float16', 'float32', 'float32', 'int64']" in result.stdout
    assert "error" in result.stdout and "PyTorch is needed" in result.stdout and ".safetensors" in result.stdout


def test_content_decides_the_format_not_the_extension(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "model.weights"  # unknown extension, safetensors inside
    save_file(tensors, str(path))
    _assert_same(read_state_dict(path), tensors)
    renamed = tmp_path / "model.safetensors"  # a pickled checkpoint wearing the wrong extension
    torch.save({"state_dict": tensors}, renamed)
    _assert_same(read_state_dict(renamed), tensors)


@pytest.mark.parametrize("keep", [5, 40, 0.5, -3])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    full = tmp_path / "full.safetensors"
    save_file(_tensors(), str(full))
    data = full.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="cut.safetensors") as error:
        read_state_dict(path)
    assert any(word in str(error.value) for word in ("truncated", "only 5 bytes"))


# --- pickled checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_weights_only_ckpt_keeps_tensors_and_global_step(tmp_path: Path, zip_format: bool) -> None:
    tensors = _tensors()
    path = tmp_path / "model.ckpt"
    payload = {"state_dict": tensors, "global_step": 875000, "epoch": 7, "pytorch-lightning_version": "1.4.2"}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    checkpoint = read_checkpoint(path)
    _assert_same(checkpoint.state_dict, tensors)  # epoch, version string and global_step are not tensors
    assert checkpoint.global_step == 875000


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": {"state_dict": sd, "epoch": 1}},
        lambda sd: {"model": {"state_dict": sd}, "global_step": 3},
    ],
    ids=["flat", "state_dict", "model", "state_dict-twice", "model-state_dict"],
)
def test_nested_state_dicts_are_unwrapped(tmp_path: Path, wrap) -> None:
    tensors = _tensors()
    path = tmp_path / "model.pt"
    torch.save(wrap(tensors), path)
    _assert_same(read_state_dict(path), tensors)


def test_bin_with_only_non_tensors_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "meta.bin"
    torch.save({"epoch": 1, "global_step": 2}, path)
    with pytest.raises(CheckpointError, match="meta.bin: no tensors found"):
        read_state_dict(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_ckpt(tmp_path: Path, zip_format: bool, keep: float) -> None:
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": _tensors()}, full, _use_new_zipfile_serialization=zip_format)
    data = full.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut.ckpt: truncated or corrupt"):
        read_state_dict(path)


# --- malicious pickles -----------------------------------------------------------------------------------------------


class _WritesFile:
    """Unpickling this calls ``open(target, "w")``: creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


class _RunsShell:
    """Unpickling this calls ``os.system("touch target")``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_that_writes_a_file_is_refused(tmp_path: Path) -> None:
    def payload(target: Path) -> bytes:
        # The hook comes first, so it is the first global the unpickler meets.
        return pickle.dumps({"hook": _WritesFile(target), "state_dict": {"w": [1.0, 2.0]}}, protocol=2)

    control = tmp_path / "control_written"
    pickle.loads(payload(control))  # the payload is live: plain pickle creates the file
    assert control.exists()

    target = tmp_path / "written_by_pickle"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(payload(target))
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refusing to load.*not tensors") as error:
        read_state_dict(path)
    assert "open" in str(error.value)
    assert not target.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_a_shell_command_is_refused(tmp_path: Path, monkeypatch, zip_format: bool) -> None:
    def save(target: Path, path: Path) -> None:
        payload = {"state_dict": {"w": torch.ones(2)}, "callbacks": _RunsShell(target)}
        torch.save(payload, path, _use_new_zipfile_serialization=zip_format)

    control = tmp_path / "control_touched"
    save(control, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)  # the payload is live when loaded unsafely
    assert control.exists()

    target = tmp_path / "touched_by_pickle"
    path = tmp_path / "evil.ckpt"
    save(target, path)
    # An environment asking torch to skip weights-only loading must not weaken our explicit weights_only=True.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refusing to load.*not tensors.*system"):
        read_state_dict(path)
    assert not target.exists()


# --- not checkpoints -----------------------------------------------------------------------------------------------

_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("notes.ckpt", b"these are not the weights you are looking for\n", "text file"),
        ("image.safetensors", _PNG + bytes(40), "PNG image"),
        ("empty.safetensors", b"", "empty"),
        ("noise.bin", bytes(range(200, 256)) * 3, "unrecognised"),
        ("pointer.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "Git LFS"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, name: str, content: bytes, what: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=name) as error:
        read_state_dict(path)
    assert "not a checkpoint" in str(error.value) and what in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such file"):
        read_state_dict(tmp_path / "nowhere.safetensors")


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"bad.safetensors: corrupt safetensors header.*'w'.*16 bytes"):
        read_state_dict(path)
