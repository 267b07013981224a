"""UNet2DConditionModel parity with diffusers for every family, config parsing, and weight conversion errors."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from sdjax.convert.unet import convert_unet, unet_param_shapes
from sdjax.convert.weights import WeightMismatchError
from sdjax.models import unet as unet_module
from sdjax.models.config import ConfigError
from sdjax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from tests.reference.unet_configs import CONFIGS, REAL_CONFIGS, SD1, SDXL, build_torch_unet

BATCH = 3

# (config, latent height, width, context tokens, scalar timestep). 13x19 is odd at every level (diffusers forwards
# the skip's size to the upsampler); the refiner's 12x20 is not a multiple of its 2^3 and forwards it as well.
CASES = {
    "sd1": (13, 19, 77, False),
    "sd2": (12, 20, 77, False),
    "sdxl": (12, 20, 77, False),
    "sdxl_refiner": (12, 20, 9, False),
    "sd1_inpaint": (12, 20, 77, False),
    "lcm": (12, 20, 77, True),
    "exotic": (12, 20, 5, False),
    "distilled": (12, 20, 7, False),
}
assert set(CASES) == set(CONFIGS), "every tiny config needs a parity case"


def assert_close(actual, ref, what: str) -> None:
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0.5, f"{what}: reference output is nearly zero ({scale:.3g}); the test would prove nothing"
    tol = 1e-4 * max(1.0, scale)
    err = float(np.abs(actual - ref).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@functools.cache
def reference(name: str):
    """(torch UNet, UNetConfig, converted params) for one tiny config, built once per session."""
    torch_unet = build_torch_unet(name, seed=len(name))
    # diffusers' own config dict holds every __init__ key (as a saved config.json does), so parsing it also checks
    # that sdjax accounts for each one.
    config = UNetConfig.from_dict(dict(torch_unet.config))
    return torch_unet, config, convert_unet(state_dict_np(torch_unet), config)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name: str) -> None:
    height, width, tokens, scalar_t = CASES[name]
    torch_unet, config, params = reference(name)
    rng = np.random.default_rng(len(name))
    sample = rng.standard_normal((BATCH, height, width, config.in_channels), dtype=np.float32)
    # Fractional timesteps (Karras schedules); one case uses a single scalar for the whole batch.
    t = np.float32(rng.uniform(0, 1000)) if scalar_t else rng.uniform(0, 1000, BATCH).astype(np.float32)
    context = rng.standard_normal((BATCH, tokens, config.cross_attention_dims[0]), dtype=np.float32)
    kwargs, torch_kwargs = {}, {}
    if config.addition_embed_type == "text_time":
        n_ids = (config.projection_class_embeddings_input_dim - 32) // config.addition_time_embed_dim
        text_embeds = rng.standard_normal((BATCH, 32), dtype=np.float32)
        time_ids = rng.uniform(0, 1024, (BATCH, n_ids)).astype(np.float32)
        kwargs.update(text_embeds=text_embeds, time_ids=time_ids)
        torch_kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(text_embeds),
                                             "time_ids": torch.from_numpy(time_ids)}
    if config.time_cond_proj_dim is not None:
        cond = rng.standard_normal((BATCH, config.time_cond_proj_dim), dtype=np.float32)
        kwargs["timestep_cond"] = cond
        torch_kwargs["timestep_cond"] = torch.from_numpy(cond)

    with torch.inference_mode():
        ref = torch_unet(torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()), torch.as_tensor(t),
                         torch.from_numpy(context), **torch_kwargs).sample.numpy().transpose(0, 2, 3, 1)

    def run(**options):
        model = UNet2DConditionModel(config, **options)
        return jax.jit(lambda p, x, t, c, kw: model.apply({"params": p}, x, t, c, **kw))(params, sample, t, context,
                                                                                          kwargs)

    out = run()
    assert out.shape == (BATCH, height, width, config.out_channels)
    assert_close(out, ref, f"{name} UNet output")

    if name == "sd2":
        # The opt-in bf16-input matmuls: really used (the numbers change) but at bf16-level accuracy.
        low = run(matmul_dtype=jax.numpy.bfloat16)
        assert low.dtype == np.float32
        err, scale = float(np.abs(low - ref).max()), float(np.abs(ref).max())
        assert 1e-4 * scale < err < 3e-2 * scale, f"bf16 matmuls: max abs error {err:.3g} (output scale {scale:.3g})"


def test_every_diffusers_config_key_is_decided() -> None:
    """Each UNet2DConditionModel.__init__ argument is a config field, a key with a required value, or a key diffusers'
    blocks never read. A new diffusers key fails here until someone decides it."""
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    decided = fields | set(unet_module._REQUIRED_VALUES) | set(unet_module._NO_EFFECT)
    keys = set(inspect.signature(TorchUNet.__init__).parameters) - {"self"}
    assert keys - decided == set()


def test_released_configs_parse() -> None:
    for name, raw in REAL_CONFIGS.items():
        config = UNetConfig.from_dict(raw)
        assert config.heads == tuple(np.broadcast_to(raw["attention_head_dim"], len(raw["down_block_types"]))), name


@pytest.mark.parametrize("name", ["sd15", "sdxl"])  # the others are covered by the tiny parity configs
def test_released_configs_convert_key_for_key(name: str) -> None:
    """The released full-size configs parse, and their diffusers state dicts (shapes only, meta device) map onto
    sdjax's parameter tree with no missing, extra or misshapen weight."""
    raw = REAL_CONFIGS[name]
    with torch.device("meta"):
        torch_unet = TorchUNet(**{k: v for k, v in raw.items() if not k.startswith("_")})
    zeros = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zeros, v.shape) for k, v in torch_unet.state_dict().items()}  # no memory
    params = convert_unet(state, UNetConfig.from_dict(raw))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert n_params == sum(p.numel() for p in torch_unet.parameters())


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True),
    ("only_cross_attention", (False, True)),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D")),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("num_attention_heads", 8),
    ("addition_embed_type", "text"),
    ("encoder_hid_dim", 64),
    ("attention_type", "gated"),
    ("time_embedding_type", "fourier"),
    ("act_fn", "gelu"),
    ("cross_attention_norm", "group_norm"),
    ("transformer_layers_per_block", ((1, 2), (1,))),
    ("block_out_channels", (32, 64, 64)),
    ("attention_head_dim", (8, 8, 8)),
    ("a_future_key", 1),
])
def test_unsupported_config_raises_naming_the_key(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key):
        UNetConfig.from_dict(dict(SD1, **{key: value}))


def test_text_time_needs_its_dimensions() -> None:
    raw = dict(SDXL)
    del raw["projection_class_embeddings_input_dim"]
    with pytest.raises(ConfigError, match="addition_embed_type"):
        UNetConfig.from_dict(raw)


def test_weight_mismatch_names_the_keys() -> None:
    torch_unet, config, _ = reference("sd1")
    good = state_dict_np(torch_unet)
    bad = dict(good)
    missing = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    del bad[missing]
    bad["down_blocks.0.attentions.1.transformer_blocks.0.attn3.to_k.weight"] = good[missing]
    wrong = "up_blocks.1.resnets.2.conv1.weight"
    bad[wrong] = good[wrong][:, :-1]
    with pytest.raises(WeightMismatchError) as info:
        convert_unet(bad, config)
    message = str(info.value)
    assert "down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel" in message  # missing
    assert "attn3.to_k.weight" in message  # unexpected
    assert wrong in message  # wrong shape
    # And a checkpoint for another config (SD2's linear projections and head counts) does not silently fit.
    with pytest.raises(WeightMismatchError):
        convert_unet(good, reference("sd2")[1])


def test_param_shapes_match_conversion() -> None:
    _, config, params = reference("sd1")
    shapes = unet_param_shapes(config)
    assert jax.tree.map(lambda s: tuple(s.shape), shapes) == jax.tree.map(lambda a: tuple(a.shape), params)


def test_bad_inputs_raise_clear_errors() -> None:
    _, config, params = reference("sd1")
    model = UNet2DConditionModel(config)
    (x, t, ctx), _ = example_inputs(config, batch=2, tokens=3)
    apply = functools.partial(model.apply, {"params": params})
    with pytest.raises(ValueError, match="NHWC"):
        apply(x.transpose(0, 3, 1, 2), t, ctx)
    with pytest.raises(ValueError, match="timesteps"):
        apply(x, t[:1].repeat(3), ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        apply(x, t, ctx[..., :-1])
    with pytest.raises(ValueError, match="text_time"):
        apply(x, t, ctx, text_embeds=ctx[:, 0])
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        apply(x, t, ctx, timestep_cond=ctx[:, 0])

    _, xl_config, xl_params = reference("sdxl")
    xl = functools.partial(UNet2DConditionModel(xl_config).apply, {"params": xl_params})
    (x, t, ctx), kw = example_inputs(xl_config, batch=2)
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        xl(x, t, ctx)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        xl(x, t, ctx, text_embeds=kw["text_embeds"], time_ids=kw["time_ids"][:, :5])

