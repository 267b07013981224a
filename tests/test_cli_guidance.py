"""The guidance options of ``sdjax generate`` as a user runs them: recorded in the metadata, changing the
image, and refused with exit status 2 (naming the option) before anything is loaded when they don't fit."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_cli import _fields, _pixels, run_cli

BASE = ("generate", "--prompt", "a green square on a white background", "--steps", "3", "--seed", "11")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_guidance_options_are_recorded_and_change_the_image(tmp_path, cache) -> None:
    plain = run_cli(*BASE, "--sampler", "euler", "--out", tmp_path / "plain", cache=cache)
    assert plain.returncode == 0, plain.stderr
    guided = run_cli(*BASE, "--sampler", "euler", "--apg", "--apg-momentum", "-0.5", "--guidance-interval", "0.5:20",
                     "--guidance-schedule", "linear", "--out", tmp_path / "apg", cache=cache)
    assert guided.returncode == 0, guided.stderr
    (a,), (b,) = (list((tmp_path / d).glob("*.png")) for d in ("plain", "apg"))
    fields = _fields(b)
    assert fields["APG"] == "eta 0, momentum -0.5, norm threshold 0"
    assert fields["Guidance interval"] == "0.5:20" and fields["CFG schedule"] == "linear"
    assert "APG" not in _fields(a)
    assert np.abs(_pixels(a) - _pixels(b)).max() > 2


@pytest.mark.parametrize(("extra", "message"), [
    (("--cfg-pp", "0.5", "--sampler", "heun"), "CFG\\+\\+ does not work with sampler 'heun'"),
    (("--cfg-pp", "0.5", "--apg"), "--cfg-pp and --apg: choose one guidance method"),
    (("--cfg-pp", "1.5"), "--cfg-pp must be in \\[0, 1\\]"),
    (("--guidance-interval", "5:1"), "--guidance-interval '5:1'"),
    (("--classifier-guidance", "shape=hexagon"), "--classifier-guidance: .*hexagon"),
])
def test_bad_guidance_options_exit_2_before_loading(tmp_path, cache, extra, message) -> None:
    import re

    proc = run_cli(*BASE, *extra, "--out", tmp_path / "out", cache=cache)
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "loading" not in proc.stderr
    assert not (tmp_path / "out").exists()
