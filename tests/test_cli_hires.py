"""``sdjax generate --hires-scale``: A1111's hires fix from the command line, recorded with A1111's keys, and
regenerated from them by ``--from-image`` (the default model, 64x64 -> 96x96, 2 steps)."""

from __future__ import annotations

from tests.test_cli import _fields, _pixels, run_cli


def test_hires_fix_end_to_end(tmp_path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = run_cli("generate", "--prompt", "a red circle on a blue background", "--steps", "2", "--height", "64",
                   "--width", "64", "--seed", "3", "--hires-scale", "1.5", "--hires-strength", "0.6",
                   "--hires-steps", "2", "--hires-upscaler", "latent (nearest)", "--out", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    first = out / "00000-3.png"
    assert _pixels(first).shape == (96, 96, 3)
    fields = _fields(first)
    # As A1111 writes a hires image: Size is the first pass's, Denoising strength the hires pass's.
    assert fields["Size"] == "64x64" and fields["Steps"] == "2"
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) == ("1.5", "2",
                                                                                         "Latent (nearest)")
    assert fields["Denoising strength"] == "0.6"

    proc = run_cli("generate", "--from-image", first, "--out", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    again = out / "00001-3.png"
    assert _fields(again) == fields
    assert (_pixels(again) == _pixels(first)).all()
