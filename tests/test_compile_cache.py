"""Warm starts: a second process with the same cache folder loads the serialized executables instead of tracing
and compiling, and makes bit-identical images.

Each process is a subprocess (a fresh JAX), with a temporary cache folder; the compile phase is what the CLI
counts (JAX's trace, lower and backend-compile events after loading) plus the time hits took to load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.conftest import HEIGHT, PROMPTS, STEPS, WIDTH

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(sampler="euler_a", num_steps=STEPS, guidance_scale=7.5, seed=11, height=HEIGHT, width=WIDTH)

CHILD = """
import json, sys, time
import jax

jax.config.update("jax_disable_most_optimizations", True)
import sdjax
from sdjax import compile_cache

folder, cache, out = sys.argv[1:4]
prompts, options = json.loads(sys.argv[4]), json.loads(sys.argv[5])
jax_seconds = [0.0]

def on_event(event, duration, **_):
    if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration"):
        jax_seconds[0] += duration

jax.monitoring.register_event_duration_secs_listener(on_event)
assert compile_cache.enable(cache) is not None
pipe = sdjax.load(folder)
jax_seconds[0] = 0.0  # as the CLI: its compile clock starts after loading
steps = []
start = time.perf_counter()
first = pipe.text_to_image(prompts, progress=lambda s, t: steps.append(s), **options)
first_seconds = time.perf_counter() - start
start = time.perf_counter()
again = pipe.text_to_image(prompts, **options)
warm_seconds = time.perf_counter() - start
import numpy as np
np.savez(out, first=first, again=again)
stats = compile_cache.stats
print(json.dumps({"load": stats["load_seconds"], "jax": jax_seconds[0], "hits": stats["hits"],
                  "misses": stats["misses"], "first": first_seconds, "warm": warm_seconds,
                  "steps": steps}))
"""


def _run(folder: Path, cache: Path, out: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("SDJAX_NO_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(folder), str(cache), str(out),
                           json.dumps(PROMPTS), json.dumps(OPTIONS)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_executables(tiny, tmp_path) -> None:
    folder = tiny("sd1").folder
    cache = tmp_path / "cache"
    cold = _run(folder, cache, tmp_path / "cold.npz")
    warm = _run(folder, cache, tmp_path / "warm.npz")
    # The cold process compiled the loop and the decoder and stored both; the second traced nothing.
    assert (cold["hits"], cold["misses"]) == (0, 2), cold
    assert (warm["hits"], warm["misses"]) == (2, 0), warm
    assert len(list((cache / "executables").glob("*.bin"))) == 2
    assert warm["jax"] < 0.05 * cold["jax"] + 0.05, (cold, warm)
    cold_phase, warm_phase = cold["load"] + cold["jax"], warm["load"] + warm["jax"]
    ratio = warm_phase / cold_phase
    print(f"compile phase: cold {cold_phase:.2f} s, second process {warm_phase:.2f} s ({ratio:.1%}); "
          f"first call {cold['first']:.2f} s vs {warm['first']:.2f} s, warm call {warm['warm']:.2f} s")
    assert ratio <= 0.5, (cold, warm)
    # Progress with the cache on: every step reported (when the loop finishes).
    assert cold["steps"] == list(range(1, STEPS + 1)) == warm["steps"]
    a, b = np.load(tmp_path / "cold.npz"), np.load(tmp_path / "warm.npz")
    assert float(a["first"].std()) > 1e-2
    np.testing.assert_array_equal(a["first"], b["first"])
    np.testing.assert_array_equal(a["first"], a["again"])
    np.testing.assert_array_equal(b["first"], b["again"])


def test_cache_folder_settings(monkeypatch, tmp_path) -> None:
    from sdjax import compile_cache

    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
    monkeypatch.delenv("SDJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "sdjax" / "jax"
    monkeypatch.setenv("SDJAX_NO_CACHE", "1")
    assert compile_cache.enable(tmp_path / "off") is None and compile_cache.directory() is None
    assert not (tmp_path / "off").exists()



REUSED = """
import sys
import jax
import jax.numpy as jnp
from sdjax import compile_cache

compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.exp(x) * 3.0 + jnp.tanh(x))
x = jnp.arange(7.0)
print(float(compile_cache.compiled(sys.argv[2], sys.argv[2], f, (x,))(x).sum()))
"""


def test_executables_jax_read_from_its_cache_are_not_stored(tmp_path) -> None:
    # On CPU an executable JAX reloaded from its persistent cache serializes without its code; storing it made
    # the next process fail at the first run ("Function multiply_exponential_fusion not found").
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("SDJAX_NO_CACHE", None)
    sums = []
    # "second" has "first"'s HLO under another key: JAX's own cache answers its compile, twice.
    for name in ("first", "second", "second", "first"):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(REUSED), str(tmp_path), name], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        sums.append(float(proc.stdout))
        assert [p.name.split("-")[0] for p in (tmp_path / "executables").glob("*.bin")] == ["first"]
    assert len(set(sums)) == 1 and sums[0] > 1.0
