"""``sdjax generate`` with A1111's ``<lora:...>`` tags in the prompt: the file found in ``--lora-dir``, the image
equal to ``--lora FILE:WEIGHT`` with the tag left out, the prompt recorded verbatim and ``Lora hashes`` as A1111
writes it (the default model, 64x64, 2 steps)."""

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


def test_lora_tag_end_to_end(tmp_path, capsys) -> None:
    cache, out, loras = tmp_path / "cache", tmp_path / "out", tmp_path / "loras"
    lora = lora_writer.save_safetensors(lora_writer.kohya_lora(TARGETS, rank=4, alpha=None, seed=5),
                                        loras / "ink.safetensors")
    prompt = "a red circle <lora:ink:0.8> on a blue background"
    common = ["--steps", "2", "--height", "64", "--width", "64", "--seed", "2", "--out", str(out)]
    proc = run_cli("generate", "--prompt", prompt, "--lora-dir", loras, *common, cache=cache)
    assert proc.returncode == 0, proc.stderr
    tagged = out / "00000-2.png"
    fields = _fields(tagged)
    assert fields["Prompt"] == prompt  # A1111 keeps the tags in the recorded prompt
    assert fields["Lora hashes"] == f"ink: {lora_short_hash(lora)}"

    proc = run_cli("generate", "--prompt", "a red circle  on a blue background", "--lora", f"{lora}:0.8", *common,
                   cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(_pixels(out / "00001-2.png"), _pixels(tagged))

    # Its metadata needs the folder again: said before anything is loaded.
    code = cli.main(["generate", "--from-image", str(tagged), "--out", str(tmp_path / "again")])
    assert code == 2 and "give --lora-dir" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
