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
    (("--dynamic-thresholding", "5", "--dt-phi", "1.5"), "--dt-phi must be in \\[0, 1\\]"),
    (("--dynamic-thresholding", "5", "--apg"), "--apg and --dynamic-thresholding: choose one"),
])
def test_bad_guidance_options_exit_2_before_loading(tmp_path, cache, extra, message) -> None:
    import re

    proc = run_cli(*BASE, *extra, "--out", tmp_path / "out", cache=cache)
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "loading" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_dynamic_thresholding_options_build_the_method_and_a1111_fields() -> None:
    """The options as the extension names them in A1111's infotext (so A1111 reads them back)."""
    from sdjax import cli
    from sdjax import guidance as g
    from sdjax.guidance import cli_options

    parser = cli._build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--guidance", "12", "--dynamic-thresholding", "6",
                              "--dt-percentile", "99.5", "--dt-cfg-mode", "cosine down", "--dt-cfg-min", "3",
                              "--dt-mimic-mode", "Power Up", "--dt-no-separate-channels", "--dt-variability", "STD"])
    method = cli_options.build(args)
    assert method == g.DynamicThresholding(12.0, mimic_scale=6.0, threshold_percentile=0.995, cfg_scale_min=3.0,
                                           cfg_mode="Cosine Down", mimic_mode="Power Up",
                                           separate_feature_channels=False, variability_measure="STD")
    fields = {k: v for k, v in cli_options.metadata(args).items() if v is not None}
    assert fields == {"Dynamic thresholding enabled": "True", "Mimic scale": "6", "Separate Feature Channels": "False",
                      "Scaling Startpoint": "MEAN", "Variability Measure": "STD", "Interpolate Phi": "1",
                      "Threshold percentile": "99.5", "Mimic mode": "Power Up", "Mimic scale minimum": "0",
                      "CFG mode": "Cosine Down", "CFG scale minimum": "3", "Scheduler value": "4"}
    plain = parser.parse_args(["generate", "--prompt", "x"])
    assert "Mimic scale" not in cli_options.metadata(plain)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--dynamic-thresholding", "6", "--dt-cfg-mode", "Tangent"])


def test_classifier_guidance_default_scales_per_head_and_fields() -> None:
    from sdjax import cli
    from sdjax import guidance as g
    from sdjax.guidance import cli_options

    parser = cli._build_parser()
    args = parser.parse_args(["generate", "--prompt", "", "--guidance", "1", "--sampler", "ddim",
                              "--classifier-guidance", "shape=square", "--classifier-guidance", "color=red"])
    outer = cli_options.build(args)
    assert isinstance(outer, g.ClassifierGuidance) and isinstance(outer.inner, g.ClassifierGuidance)
    assert (outer.inner.scale, outer.scale) == (16.0, 4.0)  # shapes need more than colours (README's table)
    assert cli_options.metadata(args)["Classifier guidance"] == "shape=square (scale 16), color=red (scale 4)"
    args = parser.parse_args(["generate", "--prompt", "", "--sampler", "ddpm", "--classifier-guidance",
                              "shape=square", "--classifier-scale", "3"])
    assert cli_options.build(args).scale == 3.0
