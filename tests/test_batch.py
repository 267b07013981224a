"""``sdjax batch`` and ``sdjax.jobs``: grouping, bad lines, SIGKILL and resume, two processes through jax.distributed.

The CLI runs in subprocesses on the embedded default model (64x64 and 32x64, 2 steps, two simulated devices).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LINES = [
    {"prompt": "a red circle", "seed": 7, "num_images": 4, "height": 64, "width": 64, "num_steps": 2},
    {"prompt": "x", "bogus": 1},  # line 2: unknown key
    {"prompt": "a blue square", "num_images": 3, "height": 64, "width": 64, "num_steps": 2},
    "not json",  # line 4
    {"prompt": "green stripes", "sampler": "ddim", "height": 32, "width": 64, "num_steps": 2, "num_images": 2},
    {"prompt": "a yellow dot", "seed": 3, "num_images": 3, "height": 64, "width": 64, "num_steps": 2,
     "guidance_scale": 5.0},
]
GOOD_LINES = (1, 3, 5, 6)
IMAGES = 4 + 3 + 2 + 3


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    return env


def _command(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdjax.cli", "batch", "--prompts", str(prompts), "--out", str(out),
            "--on-error", "skip", *extra]


def _run(prompts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(prompts, out, *extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def _manifest(out: Path) -> list[dict]:
    entries = []
    for path in sorted(out.glob("manifest*.jsonl")):
        entries += [json.loads(line) for line in path.read_text().splitlines()]
    return entries


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _assert_same_job(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == names
    assert not list(out.glob(".*.tmp"))
    for name in names:
        a, b = _pixels(out / name), _pixels(reference / name)
        differ = np.abs(a - b)
        # a batch with other batch-mates may round differently: at most 1/255 on at most 0.1 % of the values
        assert differ.max() <= 1 and (differ > 0).mean() <= 1e-3, name
        with Image.open(out / name) as im, Image.open(reference / name) as ref:
            assert im.text["parameters"] == ref.text["parameters"]
    entries = _manifest(out)
    files = [e["file"] for e in entries]
    assert sorted(files) == names  # every image listed once
    strip = lambda e: {k: v for k, v in e.items() if k != "elapsed"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, entries))) == sorted(map(json.dumps, map(strip, _manifest(reference))))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "jobs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in LINES) + "\n\n")
    return path


@pytest.fixture(scope="module")
def reference(prompts: Path) -> Path:
    """An uninterrupted single-process run."""
    out = prompts.parent / "reference"
    done = _run(prompts, out)
    assert f"{prompts}:2: skipped: unknown key(s) bogus" in done.stderr
    assert f"{prompts}:4: skipped: not JSON" in done.stderr
    assert f"{IMAGES} image(s) in {out}/: {IMAGES} generated now, 2 bad line(s) skipped" in done.stdout
    return out


def test_reference_run(reference: Path) -> None:
    entries = _manifest(reference)
    assert len(entries) == IMAGES
    assert {e["line"] for e in entries} == set(GOOD_LINES)
    by_file = {e["file"]: e for e in entries}
    assert by_file["000001-003.png"]["seed"] == 10 and by_file["000003-002.png"]["seed"] == 2  # seed + i, default 0
    assert _pixels(reference / "000005-001.png").shape == (32, 64, 3)  # the ddim line at its own size
    with Image.open(reference / "000006-001.png") as im:
        assert im.text["parameters"].startswith("a yellow dot\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 4,")
    # a rerun of a finished job generates nothing and lists nothing twice
    done = _run(reference.parent / "jobs.jsonl", reference)
    assert f"{IMAGES} image(s) in {reference}/: 0 generated now" in done.stdout
    assert len(_manifest(reference)) == IMAGES


def _run_until_killed(prompts: Path, out: Path, ready: callable) -> None:
    process = subprocess.Popen(_command(prompts, out), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and not ready():
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


def test_sigkill_and_resume(prompts: Path, reference: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    out = tmp_path / "out"
    pngs = lambda: len(list(out.glob("*.png")))  # noqa: E731
    lines = lambda: len((out / "manifest.jsonl").read_bytes().splitlines()) if (out / "manifest.jsonl").exists() else 0  # noqa: E731
    # killed just after an image file lands (most likely before its manifest line), then after the k-th
    # manifest line, then after a random delay past the next image
    _run_until_killed(prompts, out, lambda: pngs() >= 1)
    k = rng.randint(pngs() + 1, IMAGES - 5)
    _run_until_killed(prompts, out, lambda: lines() >= k)
    first = pngs()
    delay = rng.uniform(0.0, 0.2)
    deadline: list[float] = []

    def after_delay() -> bool:
        if not deadline and pngs() > first:
            deadline.append(time.monotonic() + delay)
        return bool(deadline) and time.monotonic() >= deadline[0]

    _run_until_killed(prompts, out, after_delay)
    assert pngs() < IMAGES, "the job finished before the last kill: nothing left to resume"
    # and the states a kill can leave between two writes, made for sure: an image without its manifest line,
    # a manifest line cut short, a half-written temporary image; and a listed image deleted by hand
    manifest = out / "manifest.jsonl"
    entries = manifest.read_text().splitlines()
    orphan, deleted = json.loads(entries[-1])["file"], json.loads(entries[0])["file"]
    manifest.write_text("\n".join(entries[:-1]) + '\n{"line": 1, "ima')
    (out / deleted).unlink()
    (out / f".{deleted}.x1y2.tmp").write_bytes(b"\x89PNG half")
    _run(prompts, out)
    _assert_same_job(out, reference)
    adopted = [e for e in _manifest(out) if e["elapsed"] is None]
    assert orphan in {e["file"] for e in adopted}


def test_on_error_stop(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = _command(prompts, out)
    command[command.index("skip")] = "stop"
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert f"{prompts}:2: error: unknown key(s) bogus" in done.stderr
    assert f"{prompts}:4: error: not JSON" in done.stderr
    assert "2 bad line(s)" in done.stderr and "nothing generated" in done.stderr
    assert not list(out.glob("*.png"))


def test_existing_file_from_other_settings_is_not_overwritten(prompts: Path, reference: Path, tmp_path: Path
                                                              ) -> None:
    out = tmp_path / "out"
    out.mkdir()
    other = Image.new("RGB", (64, 64), (1, 2, 3))
    other.save(out / "000003-001.png")
    done = subprocess.run(_command(prompts, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "000003-001.png exists but was not made from line 3" in done.stderr
    assert np.array_equal(_pixels(out / "000003-001.png"), np.asarray(other, np.int16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(*commands: list[str]) -> list[str]:
    processes = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stderr
    return [stdout for stdout, _ in outputs]


def test_two_processes(prompts: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    coordinator = f"127.0.0.1:{_free_port()}"
    stdout = _two_processes(*(_command(prompts, out, "--coordinator", coordinator, "--num-processes", "2",
                                       "--process-id", str(i)) for i in range(2)))
    assert "(process 0 of 2)" in stdout[0] and "(process 1 of 2)" in stdout[1]
    own = [{e["line"] for e in map(json.loads, (out / f"manifest.{i}.jsonl").read_text().splitlines())}
           for i in range(2)]
    assert own == [{1, 3, 5}, {6}]  # lines by number modulo the process count: (line - 1) % 2
    _assert_same_job(out, reference)


GLOBAL_MESH_CALL = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import sdjax
assert jax.device_count() == 4 and jax.local_device_count() == 2
pipe = sdjax.load()
images = pipe.text_to_image(["a red circle"] * 4, seed=7, height=64, width=64, num_steps=2, output="pil")
np.save(sys.argv[3], np.stack([np.asarray(im) for im in images]))
"""


def test_python_api_on_two_processes(reference: Path, tmp_path: Path) -> None:
    """Every process makes the same call over the global mesh (4 devices on 2 processes) and gets every image."""
    coordinator = f"127.0.0.1:{_free_port()}"
    _two_processes(*([sys.executable, "-c", GLOBAL_MESH_CALL, coordinator, str(i), str(tmp_path / f"{i}.npy")]
                     for i in range(2)))
    got = [np.load(tmp_path / f"{i}.npy").astype(np.int16) for i in range(2)]
    assert np.array_equal(got[0], got[1])
    expected = np.stack([_pixels(reference / f"000001-{i:03d}.png") for i in range(4)])  # seeds 7..10, batches of 2
    differ = np.abs(got[0] - expected)
    assert differ.max() <= 1 and (differ > 0).mean() <= 1e-3


def test_grouping_keys() -> None:
    """Only preparations of one compiled call share a batch; split and concat give back the request's inputs."""
    import jax

    import sdjax
    from sdjax.generation import batch_key, concat, prepare, split
    from sdjax.jobs import to_request

    pipe = sdjax.load()
    base = {"prompt": "a red circle", "height": 64, "width": 64, "num_steps": 2}
    key = lambda **o: batch_key(split(prepare(pipe, to_request(base | o)))[0])  # noqa: E731
    assert key(seed=3) == key(seed=5) == key(prompt="another prompt", negative_prompt="blurry")
    for other in ({"sampler": "ddim"}, {"height": 32}, {"num_steps": 3}, {"guidance_scale": 5.0},
                  {"prompt": "word " * 80}):  # the last: two text chunks, another context length
        assert key(**other) != key(), other
    whole = prepare(pipe, to_request(base | {"prompt": ["a", "b"], "num_images": 2, "seed": 11}))
    parts = split(whole)
    assert [p.batch for p in parts] == [1] * 4
    assert [int(p.inputs.keys[0, 1]) for p in parts] == [11, 12, 13, 14]  # PRNGKey(seed + i)
    merged = concat(parts)
    assert merged.batch == 4 and merged.plan == whole.plan
    for a, b in zip(jax.tree.leaves(merged.inputs), jax.tree.leaves(whole.inputs), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="cannot share a batch"):
        concat([parts[0], split(prepare(pipe, to_request(base | {"sampler": "ddim"})))[0]])
    with pytest.raises(ValueError, match="num_images"):
        to_request(base | {"num_images": 0})
