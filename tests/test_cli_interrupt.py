"""Ctrl-C as a user presses it (SIGINT to the process): exit status 130, no traceback, no partial output; a
killed convert's leftovers are removed by the next convert into the same place; folders follow the umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from sdjax.loaders import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent


def _start(code: str, *argv: str, umask: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env, umask=-1 if umask is None else umask)


# As the sdjax command runs it, with Ctrl-C as in a terminal: a test run started in the background (`make test &`)
# hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from sdjax import cli; "
       "sys.exit(cli.main())")


def _interrupt_when(proc: subprocess.Popen, marker: str, timeout: float = 300) -> tuple[int, str]:
    """Send SIGINT once ``marker`` shows on stderr; return the exit status and all of stderr."""
    seen = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        raise AssertionError(f"{marker!r} never showed:\n{''.join(seen)}")
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_during_generate(tmp_path) -> None:
    out = tmp_path / "out"
    proc = _start(CLI, "generate", "--prompt", "x", "--steps", "2", "--height", "64", "--width", "64", "--out",
                  str(out))
    code, err = _interrupt_when(proc, "compiling and sampling")
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() or not list(out.iterdir())


# The write of the checkpoint made slow, so that the signal lands while convert writes.
SLOW_WRITE = """import sys, time
import orbax.checkpoint as ocp
save = ocp.StandardCheckpointer.save
def slow_save(self, *args, **kwargs):
    save(self, *args, **kwargs)
    print("sdjax-test: saving", file=sys.stderr, flush=True)
    time.sleep(60)
ocp.StandardCheckpointer.save = slow_save
""" + CLI


def test_ctrl_c_during_convert_then_stale_partials_are_removed(tmp_path) -> None:
    out = tmp_path / "ck"
    code, err = _interrupt_when(_start(SLOW_WRITE, "convert", str(DEFAULT_MODEL), str(out)), "sdjax-test: saving")
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no .partial

    # What a convert killed with SIGKILL leaves: a .partial folder (and the .old of a --force replace).
    for stale in (tmp_path / ".ck.x1y2z3.partial" / "params", tmp_path / ".ck.old" / "unet"):
        stale.mkdir(parents=True)
        (stale / "data").write_text("half")
    proc = _start(CLI, "convert", str(DEFAULT_MODEL), str(out), umask=0o027)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "removed .ck.x1y2z3.partial, left by an interrupted write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # umask 027, not mkdtemp's 0700
    assert stat.S_IMODE((out / "sdjax_model.json").stat().st_mode) == 0o640
