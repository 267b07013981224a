"""LoRA merging: parity with diffusers' fused weights (kohya and PEFT files, SD1 and SDXL, UNet and text
encoders, alpha != rank, several LoRAs with their own weights), other layouts, and the error cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from sdjax.convert.clip import convert_clip_text  # noqa: E402
from sdjax.convert.lora import LoraError, apply_lora  # noqa: E402
from sdjax.convert.unet import convert_unet  # noqa: E402
from sdjax.convert.weights import flatten  # noqa: E402
from tests.conftest import Tiny  # noqa: E402
from tests.reference import lora_writer, tiny_pipelines  # noqa: E402

ATOL = 1e-6


@pytest.fixture(scope="module")
def sd1(tiny) -> Tiny:
    return tiny("sd1")


@pytest.fixture(scope="module")
def sdxl(tiny) -> Tiny:
    return tiny("sdxl")


def _numpy_state_dict(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _diffusers_fused(tiny: Tiny, files: list[tuple[Path, float]]) -> dict[str, Any]:
    """diffusers' merged weights, converted to sdjax params: load each LoRA as an adapter, weight them with
    set_adapters, fuse, unload."""
    pipe = tiny.fresh_torch()
    names = [f"lora{i}" for i in range(len(files))]
    for name, (path, _) in zip(names, files, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in files])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    params = {"unet": convert_unet(_numpy_state_dict(pipe.unet), tiny.pipe.unet.config)}
    for name, encoder in tiny.pipe.text_encoders.items():
        params[name] = convert_clip_text(_numpy_state_dict(getattr(pipe, name)), encoder.config,
                                         with_projection=encoder.module.with_projection)
    return params


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[tuple[str, ...]]:
    out = set()
    for component in after:
        a, b = flatten(before[component]), flatten(after[component])
        out |= {(component,) + p for p in a if not np.array_equal(np.asarray(a[p]), np.asarray(b[p]))}
    return out


def _assert_params_close(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    for component, ref in reference.items():
        mine, theirs = flatten(ours[component]), flatten(ref)
        assert mine.keys() == theirs.keys()
        for path, value in theirs.items():
            np.testing.assert_allclose(np.asarray(mine[path]), value, rtol=0, atol=ATOL,
                                       err_msg=f"{component}/{'/'.join(path)}")


def _snapshot(params: dict[str, Any]) -> dict[tuple[str, ...], np.ndarray]:
    return {(c,) + p: np.array(v, copy=True) for c in params for p, v in flatten(params[c]).items()}


def _parity(tiny: Tiny, files: list[tuple[Path, float]], expect_changed: int) -> None:
    original = tiny.pipe
    before = _snapshot(original.params)
    merged = apply_lora(original, [(str(path), weight) for path, weight in files])
    reference = _diffusers_fused(tiny, files)
    _assert_params_close(merged.params, reference)
    # The LoRAs changed exactly the leaves diffusers changed, and as many as the files target.
    changed = _changed(original.params, merged.params)
    assert changed == _changed(original.params, reference)
    assert len(changed) == expect_changed
    # The original pipeline is untouched.
    after = _snapshot(original.params)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert merged.params is not original.params


# --- SD1 ---------------------------------------------------------------------------------------------------------

SD1_KOHYA_A = {  # kohya module name -> (component, diffusers/transformers module)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0":
        ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
        ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),  # 1x1 conv
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),  # 3x3 LoCon
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
    "lora_unet_mid_block_resnets_1_time_emb_proj": ("unet", "mid_block.resnets.1.time_emb_proj"),
    "lora_unet_up_blocks_0_upsamplers_0_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj":
        ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj"),
    "lora_te_text_model_encoder_layers_2_mlp_fc1": ("text_encoder", "text_model.encoder.layers.2.mlp.fc1"),
}
# diffusers (0.42) reads a kohya text-encoder LoRA's attention weights only when it has an out_proj LoRA too, as
# every real kohya file does; these test files always include one.
SD1_KOHYA_B = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v":
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj":
        ("text_encoder", "text_model.encoder.layers.1.self_attn.out_proj"),
}


def _kohya(tiny: Tiny, table: dict[str, tuple[str, str]], **kwargs: Any) -> dict[str, np.ndarray]:
    return lora_writer.kohya_lora({k: tiny.torch_shape(c, m) for k, (c, m) in table.items()}, **kwargs)


def test_kohya_sd1_two_loras_match_diffusers(sd1, tmp_path):
    a = lora_writer.save_safetensors(_kohya(sd1, SD1_KOHYA_A, rank=4, alpha=2.0, seed=1), tmp_path / "a.safetensors")
    b = lora_writer.save_safetensors(_kohya(sd1, SD1_KOHYA_B, rank=2, alpha=None, seed=2), tmp_path / "b.safetensors")
    _parity(sd1, [(a, 0.7), (b, -0.4)], expect_changed=len(SD1_KOHYA_A) + 2)


def test_peft_sd1_with_metadata_and_kohya_together(sd1, tmp_path):
    scratch = tiny_pipelines.build("sd1")
    peft = lora_writer.peft_lora(
        scratch, tmp_path / "peft", {"unet": ["to_q", "to_k", "proj_in", "conv1", "ff.net.0.proj"],
                                     "text_encoder": ["q_proj", "fc1"]},
        rank=4, alpha=8.0, seed=3, alpha_pattern={"to_k": 2.0})
    b = lora_writer.save_safetensors(_kohya(sd1, SD1_KOHYA_B, rank=2, alpha=1.0, seed=4), tmp_path / "b.safetensors")
    # 4 attention blocks x (2 to_q + 2 to_k + proj_in + ff) + 8 resnet conv1 + 3 text layers x 2, plus B's to_v and
    # out_proj (its to_q and q_proj are A's too).
    _parity(sd1, [(peft, 1.3), (b, 0.5)], expect_changed=4 * 6 + 8 + 6 + 2)


def test_old_diffusers_layouts_equal_kohya(sd1):
    kohya = _kohya(sd1, SD1_KOHYA_A, rank=4, alpha=3.0, seed=5)
    names = {k: f"{c}.{m}" for k, (c, m) in SD1_KOHYA_A.items()}
    old = lora_writer.kohya_to_diffusers_old(kohya, names)
    assert any(k.endswith(".lora.down.weight") for k in old) and any(k.endswith(".alpha") for k in old)
    # The attention-processor layout for one module: attn1.processor.to_q_lora.down.weight, no "unet." prefix.
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    for part, new in (("lora.down.weight", "processor.to_q_lora.down.weight"),
                      ("lora.up.weight", "processor.to_q_lora.up.weight"), ("alpha", "processor.to_q_lora.alpha")):
        value = old.pop(f"unet.{q}.to_q.{part}")
        old[f"{q}.{new}" if part != "alpha" else f"unet.{q}.to_q.alpha"] = value
    want = apply_lora(sd1.pipe, [(kohya, 0.8)]).params
    got = apply_lora(sd1.pipe, [(old, 0.8)]).params
    assert len(_changed(sd1.pipe.params, want)) == len(SD1_KOHYA_A)
    for component in want:
        for path, value in flatten(want[component]).items():
            np.testing.assert_array_equal(np.asarray(flatten(got[component])[path]), value)


def test_merge_formula_by_hand(sd1):
    """One Linear and one 3x3 conv LoRA against W + weight * alpha / rank * up @ down, in Flax layout."""
    names = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
             "lora_unet_down_blocks_0_resnets_0_conv1")
    lora = _kohya(sd1, {k: SD1_KOHYA_A[k] for k in names}, rank=4, alpha=6.0, seed=6)
    merged = apply_lora(sd1.pipe, [(lora, 0.5)]).params["unet"]
    base = sd1.pipe.params["unet"]
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    delta = lora[f"{k}.lora_up.weight"] @ lora[f"{k}.lora_down.weight"]
    attn = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
    np.testing.assert_allclose(flatten(merged)[attn], flatten(base)[attn] + 0.5 * 1.5 * delta.T, atol=ATOL)
    c = "lora_unet_down_blocks_0_resnets_0_conv1"
    delta = np.einsum("or,rikl->oikl", lora[f"{c}.lora_up.weight"][:, :, 0, 0], lora[f"{c}.lora_down.weight"])
    conv = ("down_blocks_0", "resnets_0", "conv1", "kernel")
    np.testing.assert_allclose(flatten(merged)[conv], flatten(base)[conv] + 0.75 * delta.transpose(2, 3, 1, 0),
                               atol=ATOL)


# --- SDXL --------------------------------------------------------------------------------------------------------

SDXL_KOHYA_SGM = {  # kohya's SDXL trainer names modules after the SGM UNet
    "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    "lora_unet_input_blocks_3_1_proj_in": ("unet", "down_blocks.1.attentions.0.proj_in"),
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q":
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2":
        ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
    "lora_unet_output_blocks_3_0_out_layers_3": ("unet", "up_blocks.1.resnets.1.conv2"),
    "lora_unet_input_blocks_3_0_skip_connection": ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
    "lora_unet_middle_block_2_emb_layers_1": ("unet", "mid_block.resnets.1.time_emb_proj"),
    "lora_unet_input_blocks_2_0_op": ("unet", "down_blocks.0.downsamplers.0.conv"),
    "lora_unet_output_blocks_1_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),
    "lora_unet_time_embed_0": ("unet", "time_embedding.linear_1"),
    "lora_unet_label_emb_0_2": ("unet", "add_embedding.linear_2"),
    "lora_te1_text_model_encoder_layers_1_self_attn_v_proj":
        ("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj"),
    "lora_te1_text_model_encoder_layers_1_self_attn_out_proj":
        ("text_encoder", "text_model.encoder.layers.1.self_attn.out_proj"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2"),
    "lora_te2_text_model_encoder_layers_2_self_attn_out_proj":
        ("text_encoder_2", "text_model.encoder.layers.2.self_attn.out_proj"),
}


def test_kohya_sgm_and_peft_sdxl_match_diffusers(sdxl, tmp_path):
    kohya = lora_writer.save_safetensors(_kohya(sdxl, SDXL_KOHYA_SGM, rank=4, alpha=1.0, seed=7),
                                         tmp_path / "kohya.safetensors")
    scratch = tiny_pipelines.build("sdxl")
    peft = lora_writer.peft_lora(
        scratch, tmp_path / "peft", {"unet": ["to_v", "to_out.0", "conv_shortcut", "linear_1"],
                                     "text_encoder": ["k_proj"], "text_encoder_2": ["v_proj", "text_projection"]},
        rank=2, alpha=3.0, seed=8)
    # PEFT: 8 transformer blocks x 2 attentions x (to_v + to_out) + 5 shortcuts + 2 linear_1 + 3 + 3 + 1 text
    # modules; one shortcut and time_embedding.linear_1 are the kohya LoRA's too.
    _parity(sdxl, [(kohya, 0.9), (peft, 0.6)], expect_changed=len(SDXL_KOHYA_SGM) + 32 + 5 + 2 + 7 - 2)


# --- errors ------------------------------------------------------------------------------------------------------


def test_sdxl_lora_into_sd1_fails_clearly(sd1, sdxl, tmp_path):
    path = lora_writer.save_safetensors(_kohya(sdxl, SDXL_KOHYA_SGM, rank=2, alpha=None, seed=9),
                                        tmp_path / "xl.safetensors")
    with pytest.raises(LoraError) as info:
        apply_lora(sd1.pipe, [(path, 1.0)])
    message = str(info.value)
    assert "second text encoder (text_encoder_2), which this model does not have" in message
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in message
    # SD1's UNet has no transformer_blocks_1 and its cross-attention takes 32 features, not SDXL's 64.
    assert "input_blocks_3_1_transformer_blocks_1_attn2_to_k" in message
    assert "label_emb_0_2" in message
    assert "xl.safetensors" in message


def test_sd1_lora_into_sdxl_fails_clearly(sd1, sdxl):
    lora = _kohya(sd1, SD1_KOHYA_A, rank=2, alpha=None, seed=10)
    with pytest.raises(LoraError, match="modules this model does not have") as info:
        apply_lora(sdxl.pipe, [(lora, 1.0)])
    assert "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in str(info.value)


def test_shape_mismatch_is_reported(sd1):
    lora = lora_writer.kohya_lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64)},
                                  rank=2, alpha=None, seed=11)
    with pytest.raises(LoraError, match=r"shape \(32, 64\).*kernel is \(32, 32\)"):
        apply_lora(sd1.pipe, [(lora, 1.0)])


def test_not_a_lora_file(sd1):
    unet_file = sd1.folder / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(LoraError, match="is not a LoRA file"):
        apply_lora(sd1.pipe, [(unet_file, 1.0)])


def test_unknown_keys_missing_halves_and_variants(sd1):
    good = _kohya(sd1, {k: SD1_KOHYA_A[k] for k in list(SD1_KOHYA_A)[:2]}, rank=2, alpha=None, seed=12)
    with pytest.raises(LoraError, match="not LoRA weights.*some.random.tensor"):
        apply_lora(sd1.pipe, [({**good, "some.random.tensor": np.zeros(3)}, 1.0)])
    half = {k: v for k, v in good.items() if not k.endswith("lora_up.weight")}
    with pytest.raises(LoraError, match="no lora_up/lora_B weight"):
        apply_lora(sd1.pipe, [(half, 1.0)])
    name = next(iter(good)).split(".")[0]
    with pytest.raises(LoraError, match="unsupported LoRA variant \\(DoRA\\)"):
        apply_lora(sd1.pipe, [({**good, f"{name}.dora_scale": np.ones((1, 32))}, 1.0)])
    with pytest.raises(LoraError, match="holds no weights"):
        apply_lora(sd1.pipe, [({}, 1.0)])


def test_bad_arguments(sd1):
    with pytest.raises(TypeError, match="sequence of \\(source, weight\\) pairs"):
        apply_lora(sd1.pipe, ("x.safetensors", 1.0))
    with pytest.raises(TypeError, match="weight must be a number"):
        apply_lora(sd1.pipe, [("x.safetensors", "1")])
    # No LoRA at all: the same params, a new Pipeline.
    same = apply_lora(sd1.pipe, [])
    assert all(same.params[c] is sd1.pipe.params[c] for c in sd1.pipe.params) and same is not sd1.pipe
