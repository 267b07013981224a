"""CLIP text encoders: parity with transformers on tiny random models, conversion and config errors."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sdjax.convert.clip import (
    architectures_have_projection,
    clip_param_shapes,
    convert_clip_text,
    has_projection,
)
from sdjax.convert.weights import WeightMismatchError
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, eos_positions
from sdjax.models.config import ConfigError
from tests.reference import clip_reference as ref

BATCH = 3
LENGTHS = {"sd1": 77, "sd2": 13, "sdxl_l": 77, "sdxl_g": 77}


def assert_close(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual - expected)))
    bound = 1e-4 * max(1.0, float(np.max(np.abs(expected))))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


@functools.cache
def reference(name: str):
    model = ref.build(name)
    ids = ref.random_ids(name, BATCH, LENGTHS[name])
    return model, ids, ref.run(model, ids)


@functools.cache
def jitted_apply(config: CLIPTextConfig, with_projection: bool):
    return jax.jit(CLIPTextModel(config, with_projection=with_projection).apply)


def sdjax_outputs(name: str, state_dict, ids):
    config = CLIPTextConfig.from_dict(ref.CONFIGS[name])
    with_projection = has_projection(state_dict)
    params = convert_clip_text(state_dict, config, with_projection=with_projection)
    return jitted_apply(config, with_projection)({"params": params}, jnp.asarray(ids, jnp.int32))


@pytest.mark.parametrize("layout", ["prefixed", "bare"])
@pytest.mark.parametrize("name", list(ref.CONFIGS))
def test_parity_with_transformers(name: str, layout: str) -> None:
    model, ids, expected = reference(name)
    out = sdjax_outputs(name, ref.state_dict(model, layout), ids)
    cfg = ref.CONFIGS[name]
    assert len(out.hidden_states) == cfg["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, expected["hidden_states"], strict=True)):
        assert_close(a, b, f"{name} hidden_states[{i}]")
    assert_close(out.last_hidden_state, expected["last_hidden_state"], f"{name} last_hidden_state")
    assert_close(out.pooled, expected["pooled"], f"{name} pooled")
    if ref.WITH_PROJECTION[name]:
        assert out.text_embeds.shape == (BATCH, cfg["projection_dim"])
        assert_close(out.text_embeds, expected["text_embeds"], f"{name} text_embeds")
    else:
        assert out.text_embeds is None


def test_pooling_rules_pick_different_tokens() -> None:
    """The reference ids make transformers' two EOS rules disagree in every row, so parity checks the rule."""
    for name in ref.CONFIGS:
        ids = ref.random_ids(name, BATCH, LENGTHS[name])
        eos = ref.CONFIGS[name]["eos_token_id"]
        by_argmax = ids.argmax(axis=-1)
        by_first_eos = (ids == eos).argmax(axis=-1)
        assert np.all(by_argmax != by_first_eos), name
        expected = by_argmax if eos == 2 else by_first_eos
        np.testing.assert_array_equal(np.asarray(eos_positions(jnp.asarray(ids), eos)), expected)
        assert len(set(expected.tolist())) == BATCH, name


def test_saved_checkpoint_and_config(tmp_path) -> None:
    """What transformers' save_pretrained writes: config.json parses; the key layout and projection are found."""
    for name in ("sd1", "sdxl_g"):
        model, ids, expected = reference(name)
        model.save_pretrained(tmp_path / name)
        raw = json.loads((tmp_path / name / "config.json").read_text())
        state = load_file(tmp_path / name / "model.safetensors")
        assert has_projection(state) == architectures_have_projection(raw) == ref.WITH_PROJECTION[name]
        config = CLIPTextConfig.from_dict(raw)
        params = convert_clip_text(state, config, with_projection=has_projection(state))
        out = jitted_apply(config, has_projection(state))({"params": params}, jnp.asarray(ids, jnp.int32))
        assert_close(out.pooled, expected["pooled"], f"{name} pooled")


def test_hub_style_config_and_position_ids_buffer() -> None:
    """An SD 1.x hub config.json (transformers 4.22) parses; the old ``position_ids`` buffer is skipped."""
    raw = {
        "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    }
    config = CLIPTextConfig.from_dict(raw)
    assert (config.hidden_size, config.num_hidden_layers, config.eos_token_id) == (768, 12, 2)
    assert not architectures_have_projection(raw)
    hash(config)  # static under jit

    model, _, _ = reference("sd1")
    state = ref.state_dict(model, "prefixed")
    state["text_model.embeddings.position_ids"] = np.arange(77)[None]
    params = convert_clip_text(state, CLIPTextConfig.from_dict(ref.CONFIGS["sd1"]), with_projection=False)
    assert params["encoder"]["layers_2"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)


def test_weight_mismatches_name_the_keys() -> None:
    model, _, _ = reference("sd1")
    config = CLIPTextConfig.from_dict(ref.CONFIGS["sd1"])
    state = ref.state_dict(model, "prefixed")
    del state["text_model.encoder.layers.1.mlp.fc2.weight"]
    state["text_model.embeddings.token_embedding.weight"] = np.zeros((999, 32), np.float32)
    with pytest.raises(WeightMismatchError) as info:
        convert_clip_text(state, config, with_projection=False)
    message = str(info.value)
    assert "encoder/layers_1/mlp/fc2/kernel" in message
    assert "text_model.embeddings.token_embedding.weight" in message and "(999, 32)" in message

    # A projection checkpoint loaded without one, and the reverse.
    g_model, _, _ = reference("sdxl_g")
    g_config = CLIPTextConfig.from_dict(ref.CONFIGS["sdxl_g"])
    g_state = ref.state_dict(g_model, "prefixed")
    with pytest.raises(WeightMismatchError, match="text_projection.weight"):
        convert_clip_text(g_state, g_config, with_projection=False)
    del g_state["text_projection.weight"]
    with pytest.raises(WeightMismatchError, match="text_projection/kernel"):
        convert_clip_text(g_state, g_config, with_projection=True)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"model_type": "clip_vision_model"}, "model_type"),
        ({"position_embedding_type": "rotary"}, "position_embedding_type"),
        ({"text_config": {"hidden_size": 32}}, "text_config"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
    ],
)
def test_unsupported_config_raises(change: dict, named: str) -> None:
    raw = {**ref.CONFIGS["sd1"], "model_type": "clip_text_model", **change}
    with pytest.raises(ConfigError, match=named):
        CLIPTextConfig.from_dict(raw)


def test_bad_input_ids() -> None:
    config = CLIPTextConfig.from_dict(ref.CONFIGS["sd2"])
    model = CLIPTextModel(config)
    params = jax.tree.map(jnp.zeros_like, clip_param_shapes(config, False))
    with pytest.raises(ValueError, match="at most 77"):
        model.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model.apply({"params": params}, jnp.zeros((77,), jnp.int32))


def test_half_precision_compute() -> None:
    name = "sdxl_g"
    model, ids, expected = reference(name)
    config = CLIPTextConfig.from_dict(ref.CONFIGS[name])
    params = convert_clip_text(ref.state_dict(model, "bare"), config, with_projection=True)
    out = CLIPTextModel(config, with_projection=True, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out.text_embeds, np.float32) - expected["text_embeds"]))
    assert err <= 0.05 * max(1.0, np.max(np.abs(expected["text_embeds"])))
