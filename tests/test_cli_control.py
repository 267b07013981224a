"""A canny-ControlNet job through ``sdjax generate`` as a user runs it, on the embedded default model with a
ControlNet made from its UNet (random zero convs, so the control image changes the result)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli import _fields, _pixels, run_cli

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdjax.loaders import DEFAULT_MODEL

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet"))
    with torch.no_grad():  # zero convs start at zero: give them weights so the control image matters
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("cn") / "control_canny"
    net.save_pretrained(folder)
    return folder


def test_canny_controlnet_job_end_to_end(tmp_path, controlnet) -> None:
    cache = tmp_path / "cache"
    yy, xx = np.mgrid[0:64, 0:64]
    photo = Image.fromarray(((np.hypot(yy - 32, xx - 32) < 18) * 255).astype(np.uint8)).convert("RGB")
    photo.save(tmp_path / "photo.png")
    base = ("generate", "--prompt", "a red circle on a blue background", "--steps", "3", "--seed", "3")
    plain = run_cli(*base, "--out", tmp_path / "plain", cache=cache)
    assert plain.returncode == 0, plain.stderr
    proc = run_cli(*base, "--controlnet", f"{controlnet}:0.8", "--control-image", tmp_path / "photo.png",
                   "--control-preprocess", "canny", "--out", tmp_path / "cn", cache=cache)
    assert proc.returncode == 0, proc.stderr
    (a,), (b,) = (list((tmp_path / d).glob("*.png")) for d in ("plain", "cn"))
    field = _fields(b)["ControlNet 0"]
    assert "Module: canny" in field and "Weight: 0.8" in field and "control_canny" in field
    assert np.abs(_pixels(a) - _pixels(b)).max() > 2


def test_control_options_are_checked_before_loading(tmp_path) -> None:
    proc = run_cli("generate", "--prompt", "x", "--controlnet", tmp_path / "missing", "--control-image",
                   tmp_path / "x.png", "--out", tmp_path / "o", cache=tmp_path / "cache")
    assert proc.returncode == 2 and "--controlnet" in proc.stderr
    proc = run_cli("generate", "--prompt", "x", "--control-image", tmp_path / "x.png", "--out", tmp_path / "o",
                   cache=tmp_path / "cache")
    assert proc.returncode == 2 and "--control-image needs --controlnet" in proc.stderr
