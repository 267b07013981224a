"""Shared fixtures: tiny random diffusers pipelines, built and saved once per session (per xdist worker), each
paired with the sdjax Pipeline loaded from the saved folder.

Every tiny VAE gets a very negative bias on the log-variance half of ``quant_conv`` (in the PyTorch model
before saving, so the folder has it too): the posterior's std is then ~1e-6 and a VAE *sample* equals its
mean on both sides, which makes image-to-image and inpainting comparable although the posterior noise
can't come from the same random stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch

# Tests run two or more at a time on few cores: one thread each keeps the PyTorch references from fighting.
torch.set_num_threads(1)
# The tiny models run in milliseconds: compiling is what the suite spends its time on, and XLA compiles them
# about a quarter faster (CPU time, measured on tests/test_unet.py) with most optimisations off. Modules that
# run many samples of the default model turn them back on with the `optimized` fixture.
jax.config.update("jax_disable_most_optimizations", True)

LOGVAR_BIAS = -28.0  # exp(0.5 * -28) ~ 8e-7: the posterior sample is the mean


@dataclasses.dataclass(frozen=True)
class Tiny:
    """A tiny reference model: the PyTorch diffusers pipeline, the sdjax Pipeline and the folder both used."""

    kind: str
    torch_pipe: Any
    pipe: Any
    folder: Path
    scheduler_config: dict[str, Any]  # as saved: what sdjax reads and what diffusers' swapped schedulers start from

    def fresh_torch(self) -> Any:
        """A new PyTorch pipeline from the folder, for tests that change it (LoRA loading, embeddings)."""
        pipe = type(self.torch_pipe).from_pretrained(self.folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def torch_shape(self, component: str, module: str) -> tuple[int, ...]:
        state = getattr(self.torch_pipe, component).state_dict()
        # transformers >= 5.6 names CLIPTextModel's weights without the "text_model." prefix.
        key = module + ".weight" if module + ".weight" in state else module.removeprefix("text_model.") + ".weight"
        return tuple(state[key].shape)


REPO = Path(__file__).resolve().parent.parent


def run_on_simulated_devices(code: str, *args: str, devices: int = 4) -> Any:
    """Run ``code`` in a child Python that has ``devices`` simulated CPU devices and this checkout's sdjax;
    return the JSON of its last stdout line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the {devices}-device run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def deterministic_vae(torch_pipe: Any) -> None:
    """Make the VAE posterior (nearly) a point mass: log-variance channels of quant_conv biased to -28."""
    vae = torch_pipe.vae
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:] = LOGVAR_BIAS


_TINY: dict[str, Tiny] = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """``tiny(kind)`` -> :class:`Tiny` for 'sd1', 'sd2', 'sdxl', 'sdxl_refiner' or 'sd1_inpaint'; built once."""
    import sdjax
    from tests.reference.tiny_pipelines import build

    def get(kind: str) -> Tiny:
        if kind not in _TINY:
            torch_pipe = build(kind)
            deterministic_vae(torch_pipe)
            folder = tmp_path_factory.mktemp(f"tiny_{kind}")
            torch_pipe.save_pretrained(folder, safe_serialization=True)
            # As the real SD 1.x / 2.x configs say: DDIM and DDPM would otherwise default to clipping x0.
            config_file = folder / "scheduler" / "scheduler_config.json"
            scheduler_config = {**json.loads(config_file.read_text()), "clip_sample": False}
            config_file.write_text(json.dumps(scheduler_config, indent=2))
            _TINY[kind] = Tiny(kind, torch_pipe, sdjax.load(folder), folder, scheduler_config)
        return _TINY[kind]

    return get


@pytest.fixture(autouse=True)
def _no_compile_cache_left_on():
    """A test that runs the CLI in this process turns the compile cache on (as the CLI does); the tests after it
    in this worker must not inherit it (they count compiles through an un-jitted stand-in)."""
    yield
    from sdjax import compile_cache

    compile_cache.disable()


@pytest.fixture(scope="module")
def optimized():
    """XLA's full optimisation for a module whose time goes into running a model, not compiling it."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def fast_compile():
    """Compile with most XLA optimisations off: the tiny models run in milliseconds either way, but compiling
    each sampler loop takes several seconds at full optimisation (about half that without). Only the
    compiles made inside the test are affected; the flag is restored afterwards."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def assert_differ(a: Any, b: Any, what: str, tol: float = 4e-3) -> None:
    """An option's effect on the images: by default more than twice the parity tolerance, so that a parity
    check of that option could tell whether it was applied."""
    diff = float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
    assert diff > tol, f"{what} changed the images by only {diff:.3g}"


def assert_images_close(actual: Any, reference: Any, what: str, tol: float = 2e-3) -> None:
    """Max abs difference of [0, 1] images (or latents) within ``tol``; the reference must not be flat."""
    actual, reference = np.asarray(actual, np.float32), np.asarray(reference, np.float32)
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != reference {reference.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = float(np.abs(actual - reference).max())
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol:g}"
    assert float(reference.std()) > 1e-2, f"{what}: the reference is flat (std {reference.std():.3g})"


# --- shared settings and helpers of the generation tests ------------------------------------------------

# Two different prompts, non-square 64x96 pixels (8x12 latents), few steps: every compiled configuration is
# reused by as many checks as possible.
PROMPTS = ["a photo of a red cat sitting on a chair", "a watercolor painting of a blue dog on a hill"]
NEGATIVES = ["blurry, low quality", "ugly cartoon"]
HEIGHT, WIDTH = 64, 96
STEPS = 5
GUIDANCE = 7.5


def noise(batch: int = 2, seed: int = 0, channels: int = 4) -> np.ndarray:
    """Standard-normal starting latents in diffusers' (B, C, H/8, W/8) layout."""
    return np.random.default_rng(seed).standard_normal((batch, channels, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def set_scheduler(tiny: Tiny, scheduler_class: Any, torch_pipe: Any = None, **overrides: Any) -> Any:
    """Swap the scheduler of ``torch_pipe`` (default: the tiny model's own pipeline) for one of
    ``scheduler_class`` made from the model's config (betas, spacing, prediction type): only the sampler
    changes. Returns the pipeline."""
    torch_pipe = tiny.torch_pipe if torch_pipe is None else torch_pipe
    torch_pipe.scheduler = scheduler_class.from_config(tiny.scheduler_config, **overrides)
    return torch_pipe


def input_images(seed: int = 0, batch: int = 2) -> list:
    """Smooth, different RGB PIL images of the test size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    out = []
    for _ in range(batch):
        f = rng.uniform(1, 4, (3, 2))
        ph = rng.uniform(0, 6, 3)
        rgb = [0.5 + 0.4 * np.sin(f[c, 0] * 3 * yy + f[c, 1] * 4 * xx + ph[c]) for c in range(3)]
        arr = np.stack(rgb, -1) + rng.normal(0, 0.05, (HEIGHT, WIDTH, 3))
        out.append(Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)))
    return out


class FixedNoise:
    """Stand-in for a diffusers pipeline module's ``randn_tensor``: returns the given noise (checking its shape)
    so the diffusers reference adds the same noise as sdjax's ``latents=``. Counts its calls."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = torch.from_numpy(np.ascontiguousarray(value))
        self.calls = 0

    def __call__(self, shape: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert tuple(shape) == tuple(self.value.shape), f"diffusers drew noise of shape {tuple(shape)}"
        self.calls += 1
        return self.value.clone()


# Modules whose tests share a module-scoped fixture (a CLI run, a pipeline, 64 samples): split over two xdist
# workers, such a module builds it twice. They are read from the source, as xdist's controller schedules by
# test id before any fixture is known (and xdist 3.8's --dist loadgroup does not work with pytest 9).
_SHARED_FIXTURE = re.compile(r'scope="module"|usefixtures\("optimized"\)')
_GROUPED = frozenset(f"tests/{p.name}" for p in Path(__file__).parent.glob("test_*.py")
                     if _SHARED_FIXTURE.search(p.read_text()))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        """Each such module on one worker, every other test on its own."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in _GROUPED else nodeid

    return ModuleFixtureScheduling(config, log)
