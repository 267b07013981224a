"""``sdjax generate`` with A1111's hires fix and a ``<lora:...>`` tag in the prompt, in one run of the default
model (64x64 -> 96x96, 2 steps): A1111's metadata keys (Size the first pass's, the prompt with its tag, Lora
hashes), the same image from ``--from-image``, and the same image as ``--lora FILE:WEIGHT`` with the tag left out."""

from __future__ import annotations

import numpy as np

from sdjax import cli
from sdjax.hashes import lora_short_hash
from tests.reference import lora_writer
from tests.test_cli import _fields, _pixels, run_cli

# Modules of the default model (PyTorch weight shapes) a LoRA changes: cross-attention and the text encoder.
TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (64, 64),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v": (96, 64),
    "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k": (64, 64),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (64, 64),
}


def test_hires_fix_and_lora_tag_end_to_end(tmp_path, capsys) -> None:
    cache, out, loras = tmp_path / "cache", tmp_path / "out", tmp_path / "loras"
    lora = lora_writer.save_safetensors(lora_writer.kohya_lora(TARGETS, rank=4, alpha=None, seed=5),
                                        loras / "ink.safetensors")
    prompt = "a red circle <lora:ink:0.8> on a blue background"
    hires = ["--hires-scale", "1.5", "--hires-strength", "0.6", "--hires-steps", "2", "--hires-upscaler",
             "latent (nearest)"]
    common = ["--steps", "2", "--height", "64", "--width", "64", "--seed", "3", "--out", str(out)]
    proc = run_cli("generate", "--prompt", prompt, "--lora-dir", loras, *hires, *common, cache=cache)
    assert proc.returncode == 0, proc.stderr
    first = out / "00000-3.png"
    assert _pixels(first).shape == (96, 96, 3)
    fields = _fields(first)
    # As A1111 writes a hires image: Size is the first pass's, Denoising strength the hires pass's; the prompt
    # keeps its tags, and Lora hashes has A1111's LoRA hash.
    assert fields["Size"] == "64x64" and fields["Steps"] == "2"
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) == ("1.5", "2",
                                                                                         "Latent (nearest)")
    assert fields["Denoising strength"] == "0.6"
    assert fields["Prompt"] == prompt and fields["Lora hashes"] == f"ink: {lora_short_hash(lora)}"

    proc = run_cli("generate", "--from-image", first, "--lora-dir", loras, "--out", out, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert _fields(out / "00001-3.png") == fields and "warning" not in proc.stderr, proc.stderr
    assert (_pixels(out / "00001-3.png") == _pixels(first)).all()

    proc = run_cli("generate", "--prompt", "a red circle  on a blue background", "--lora", f"{lora}:0.8", *hires,
                   *common, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(_pixels(out / "00002-3.png"), _pixels(first))

    # Without the folder the tag is an error, said before anything is loaded.
    code = cli.main(["generate", "--from-image", str(first), "--out", str(tmp_path / "again")])
    assert code == 2 and "give --lora-dir" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
