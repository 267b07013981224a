"""ControlNet parity with diffusers (SD1-like, SDXL-like, every other knob), loading from diffusers folders and
A1111 control files, MultiControlNet sums, the UNet's residual inputs, start/end keep and control images."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.control import (
    controlnet_keep,
    controlnet_residuals,
    effective_guess_mode,
    guess_mode_cfg_residuals,
    guidance_ranges,
    load_controlnet,
    prepare_control_image,
)
from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.unet import convert_unet
from sdjax.convert.weights import WeightMismatchError
from sdjax.models.config import ConfigError
from sdjax.models.controlnet import ControlNetConfig
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from tests.reference.control_models import CONTROLNET_CONFIGS, build_torch_controlnet, controlnet_to_ldm
from tests.reference.unet_configs import SD1, build_torch_unet

BATCH = 2


def assert_close(actual, ref, what: str) -> None:
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0.1, f"{what}: reference is nearly zero ({scale:.3g}); the test would prove nothing"
    err = float(np.abs(actual - ref).max())
    assert err <= 1e-4 * max(1.0, scale), f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@functools.cache
def saved(name: str, tmp: str):
    """(torch ControlNet, folder it was saved to) for one tiny config."""
    from pathlib import Path

    torch_net = build_torch_controlnet(name, seed=len(name) + 3)
    folder = Path(tmp) / f"controlnet_{name}"
    torch_net.save_pretrained(folder, safe_serialization=True)
    return torch_net, folder


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("controlnets"))


def inputs(config: ControlNetConfig, rng: np.random.Generator, height: int = 5, width: int = 7, tokens: int = 9):
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    sample = rng.standard_normal((BATCH, height, width, config.in_channels), dtype=np.float32)
    t = rng.uniform(0, 1000, BATCH).astype(np.float32)
    context = rng.standard_normal((BATCH, tokens, config.cross_attention_dim), dtype=np.float32)
    cond = rng.uniform(0, 1, (BATCH, height * factor, width * factor, config.conditioning_channels)).astype(np.float32)
    added = {}
    if config.addition_embed_type == "text_time":
        added = {"text_embeds": rng.standard_normal((BATCH, 32), dtype=np.float32),
                 "time_ids": rng.uniform(0, 1024, (BATCH, 6)).astype(np.float32)}
    return sample, t, context, cond, added


def torch_residuals(torch_net, sample, t, context, cond, added, scale, guess_mode):
    kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
    with torch.inference_mode():
        down, mid = torch_net(nchw(sample), torch.from_numpy(t), torch.from_numpy(context), nchw(cond),
                              conditioning_scale=scale, guess_mode=guess_mode, return_dict=False, **kwargs)
    return [nhwc(d) for d in down], nhwc(mid)


@pytest.mark.parametrize("name", list(CONTROLNET_CONFIGS))
def test_parity_with_diffusers(name: str, tmp: str, fast_compile) -> None:
    torch_net, folder = saved(name, tmp)
    net = load_controlnet(folder)
    assert net.config == ControlNetConfig.from_dict(dict(torch_net.config))
    rng = np.random.default_rng(len(name))
    sample, t, context, cond, added = inputs(net.config, rng)
    run = jax.jit(lambda p, x, t, c, im, s, kw, guess: net.module.apply({"params": p}, x, t, c, im, s,
                                                                        guess_mode=guess, **kw),
                  static_argnums=7)
    # Each (scale, guess mode) is one compile: both only where it costs least.
    cases = {"sd1": ((1.0, False), (0.65, True)), "sd2": ((0.9, False),), "sdxl": ((0.65, True),),
             "exotic": ((0.65, False),)}[name]
    for scale, guess in cases:
        ref_down, ref_mid = torch_residuals(torch_net, sample, t, context, cond, added, scale, guess)
        down, mid = run(net.params, sample, t, context, cond, scale, added, guess)
        assert len(down) == len(ref_down) == net.config.num_down_residuals
        if name == "sd1":  # the same encoder as unet_configs.SD1: its residuals fit that UNet's skips
            assert [tuple(d.shape[1:]) for d in down] == _skip_shapes(UNetConfig.from_dict(SD1), *sample.shape[1:3])
        for i, (a, b) in enumerate(zip(down, ref_down, strict=True)):
            assert_close(a, b, f"{name} down residual {i} (scale {scale}, guess {guess})")
        assert_close(mid, ref_mid, f"{name} mid residual (scale {scale}, guess {guess})")


@pytest.mark.parametrize("name, suffix", [("sd1", ".safetensors"), ("sd1", ".pth"), ("sdxl", ".safetensors")])
def test_a1111_control_file(name: str, suffix: str, tmp: str, tmp_path) -> None:
    """An LDM-layout control file (``control_model.`` keys; .pth through the weights-only loader) loads to the same
    params as the diffusers folder; the old full-model files' other keys are ignored."""
    from safetensors.torch import save_file

    torch_net, folder = saved(name, tmp)
    ldm = controlnet_to_ldm(torch_net.state_dict(), CONTROLNET_CONFIGS[name])
    path = tmp_path / f"control_tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
        if name == "sd1":  # the test writer itself, checked by diffusers' own reader of such files
            from diffusers import ControlNetModel

            back = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
            assert all(torch.equal(v, back.state_dict()[k]) for k, v in torch_net.state_dict().items())
    else:
        torch.save(dict(ldm, **{"model.diffusion_model.out.2.weight": torch.zeros(3)}), path)  # a full file's key
    reference = load_controlnet(folder)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), load_controlnet(path, config=folder).params,
                        reference.params)
    assert all(jax.tree.leaves(same))
    if name != "sd1":
        return
    # A diffusers-layout single file: its config.json beside it, or config=.
    single = folder / "diffusion_pytorch_model.safetensors"
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), load_controlnet(single).params,
                                            reference.params)))
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(single.read_bytes())
    with pytest.raises(CheckpointError, match="config"):
        load_controlnet(alone)
    with pytest.raises(CheckpointError, match="no such"):
        load_controlnet(tmp_path / "missing.safetensors")
    bare = tmp_path / "bare.safetensors"  # thibaud's SD 2.1 files: no control_model. prefix
    save_file({k.removeprefix("control_model."): v.contiguous() for k, v in ldm.items()}, str(bare))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                        load_controlnet(bare, config=dict(torch_net.config)).params, reference.params)
    assert all(jax.tree.leaves(same))
    with pytest.raises(CheckpointError, match="model family"):
        load_controlnet(bare)  # a tiny width matches no released family: config= is needed


def test_released_ldm_configs_are_recognised() -> None:
    from sdjax.convert.controlnet import LDM_CONFIGS, ldm_config

    key = "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    hint = {"control_model.input_hint_block.0.weight": np.zeros((16, 3, 3, 3))}
    assert ldm_config({key: np.zeros((320, 768)), **hint})["cross_attention_dim"] == 768
    assert ldm_config({key: np.zeros((320, 1024)), **hint})["attention_head_dim"] == [5, 10, 20, 20]
    assert ldm_config({"control_model.label_emb.0.0.weight": np.zeros(1), **hint})["addition_embed_type"] == \
        "text_time"
    for raw in LDM_CONFIGS.values():
        ControlNetConfig.from_dict(raw)


def test_bad_configs_and_weights_raise(tmp: str) -> None:
    with pytest.raises(ConfigError, match="mid_block_type"):
        ControlNetConfig.from_dict(dict(CONTROLNET_CONFIGS["sd1"], mid_block_type="UNetMidBlock2DSimpleCrossAttn"))
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig.from_dict(dict(CONTROLNET_CONFIGS["sd1"], controlnet_conditioning_channel_order="rbg"))
    with pytest.raises(ConfigError, match="class_embed_type"):
        ControlNetConfig.from_dict(dict(CONTROLNET_CONFIGS["sd1"], class_embed_type="timestep"))
    torch_net, folder = saved("sd1", tmp)
    with pytest.raises(WeightMismatchError):
        load_controlnet(folder, config=CONTROLNET_CONFIGS["exotic"])
    net = load_controlnet(folder)
    sample, t, context, cond, _ = inputs(net.config, np.random.default_rng(0))
    with pytest.raises(ValueError, match="controlnet_cond"):
        net(sample, t, context, cond[:, :-8])
    with pytest.raises(ValueError, match="text_embeds"):
        net(sample, t, context, cond, text_embeds=context[:, 0], time_ids=context[:, 0, :6])


def test_multi_controlnet_sums_and_guess_mode(tmp: str, fast_compile) -> None:
    """Two ControlNets: the residuals are the sums of each one's at its own scale and image (diffusers'
    MultiControlNetModel), compared against diffusers'."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    torch_a, folder_a = saved("sd1", tmp)
    torch_b = build_torch_controlnet("sd1", seed=99)
    nets = [load_controlnet(folder_a)]
    folder_b = folder_a.parent / "controlnet_sd1_b"
    torch_b.save_pretrained(folder_b)
    nets.append(load_controlnet(folder_b))
    rng = np.random.default_rng(5)
    sample, t, context, cond_a, _ = inputs(nets[0].config, rng)
    cond_b = rng.uniform(0, 1, cond_a.shape).astype(np.float32)
    multi = MultiControlNetModel([torch_a, torch_b])
    for guess in (False, True):
        with torch.inference_mode():
            ref_down, ref_mid = multi(nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
                                      [nchw(cond_a), nchw(cond_b)], [0.8, 0.3], guess_mode=guess, return_dict=False)
        fn = jax.jit(lambda x, t, c, a, b, s, guess=guess: controlnet_residuals(nets, x, t, c, [a, b], s,
                                                                                guess_mode=guess))
        down, mid = fn(sample, t, context, cond_a, cond_b, np.array([0.8, 0.3], np.float32))
        for i, (a, b) in enumerate(zip(down, ref_down, strict=True)):
            assert_close(a, nhwc(b), f"multi down {i} guess={guess}")
        assert_close(mid, nhwc(ref_mid), f"multi mid guess={guess}")

    # Scales are traced: new values, same compiled function.
    fn(sample, t, context, cond_a, cond_b, np.array([0.1, 1.5], np.float32))
    assert fn._cache_size() == 1

    padded_down, padded_mid = guess_mode_cfg_residuals(down, mid, BATCH)
    assert padded_mid.shape[0] == 2 * BATCH and not np.asarray(padded_mid[:BATCH]).any()
    np.testing.assert_array_equal(padded_down[0][BATCH:], down[0])
    assert effective_guess_mode(nets, False) is False
    assert effective_guess_mode([load_controlnet(saved("exotic", tmp)[1])], False) is True  # global pooling
    with pytest.raises(ValueError, match="scales"):
        controlnet_residuals(nets, sample, t, context, [cond_a, cond_b], [1.0])


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_residual_inputs_match_diffusers(name: str, fast_compile) -> None:
    """The UNet given ControlNet residuals (down and mid) and, separately, T2I-Adapter intrablock residuals
    computes what diffusers' UNet2DConditionModel computes with the same residuals."""
    torch_unet = build_torch_unet(name, seed=11)
    config = UNetConfig.from_dict(dict(torch_unet.config))
    params = convert_unet({k: v.numpy() for k, v in torch_unet.state_dict().items()}, config)
    rng = np.random.default_rng(3)
    height, width = 6, 10
    sample = rng.standard_normal((BATCH, height, width, 4), dtype=np.float32)
    t = rng.uniform(0, 1000, BATCH).astype(np.float32)
    context = rng.standard_normal((BATCH, 7, config.cross_attention_dims[0]), dtype=np.float32)
    kwargs, torch_kwargs = {}, {}
    if config.addition_embed_type == "text_time":
        kwargs = {"text_embeds": rng.standard_normal((BATCH, 32), dtype=np.float32),
                  "time_ids": rng.uniform(0, 1024, (BATCH, 6)).astype(np.float32)}
        torch_kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in kwargs.items()}}
    # Skip shapes as diffusers produces them: run its down path once through hooks-free arithmetic.
    shapes = _skip_shapes(config, height, width)
    down = [rng.standard_normal((BATCH,) + s, dtype=np.float32) for s in shapes]
    mid = rng.standard_normal((BATCH,) + shapes[-1], dtype=np.float32)
    model = UNet2DConditionModel(config)
    apply = jax.jit(lambda p, x, t, c, kw: model.apply({"params": p}, x, t, c, **kw))

    # T2I-Adapter: one feature per down block (at its resolution after the block for DownBlock2D, before the
    # downsampler for CrossAttnDownBlock2D), and for SDXL-like UNets one more of the mid block's shape.
    feats = [rng.standard_normal((BATCH,) + s, dtype=np.float32) for s in _intrablock_shapes(config, height, width)]
    control = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
    adapter = {"down_intrablock_additional_residuals": tuple(feats)}
    # SD1: each kind alone; SDXL: both at once (diffusers allows it), one compile of the bigger UNet.
    cases = {"ControlNet": control, "T2I-Adapter": adapter} if name == "sd1" else {"both": control | adapter}
    with torch.inference_mode():
        plain = torch_unet(nchw(sample), torch.from_numpy(t), torch.from_numpy(context), **torch_kwargs).sample
    for what, extra in cases.items():
        torch_extra = {k: (list if "intrablock" in k else tuple)(nchw(a) for a in v) if isinstance(v, tuple)
                       else nchw(v) for k, v in extra.items()}
        with torch.inference_mode():
            ref = torch_unet(nchw(sample), torch.from_numpy(t), torch.from_numpy(context), **torch_extra,
                             **torch_kwargs).sample
        out = apply(params, sample, t, context, dict(kwargs, **extra))
        assert_close(out, nhwc(ref), f"{name} UNet with {what} residuals")
        assert float(np.abs(nhwc(ref) - nhwc(plain)).max()) > 1e-2  # the residuals matter

    with pytest.raises(ValueError, match="mid_block_additional_residual"):
        model.apply({"params": params}, sample, t, context, down_block_additional_residuals=tuple(down), **kwargs)


def _sizes(config: UNetConfig, height: int, width: int) -> list[tuple[int, int]]:
    sizes = [(height, width)]
    for _ in range(config.num_blocks - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _skip_shapes(config: UNetConfig, height: int, width: int) -> list[tuple[int, int, int]]:
    sizes = _sizes(config, height, width)
    shapes = [sizes[0] + (config.block_out_channels[0],)]
    for i in range(config.num_blocks):
        shapes += [sizes[i] + (config.block_out_channels[i],)] * config.layers[i]
        if i < config.num_blocks - 1:
            shapes.append(sizes[i + 1] + (config.block_out_channels[i],))
    return shapes


def _intrablock_shapes(config: UNetConfig, height: int, width: int) -> list[tuple[int, int, int]]:
    sizes = _sizes(config, height, width)
    out = []
    for i, kind in enumerate(config.down_block_types):
        downsampled = kind == "DownBlock2D" and i < config.num_blocks - 1
        out.append(sizes[i + 1 if downsampled else i] + (config.block_out_channels[i],))
    if config.addition_embed_type == "text_time":
        out.append(sizes[-1] + (config.block_out_channels[-1],))
    return out


def test_keep_matches_diffusers_rule() -> None:
    import sdjax

    assert sdjax.load_controlnet is load_controlnet  # the public name
    starts, ends = guidance_ranges(2, [0.0, 0.2], 0.8)
    assert (starts, ends) == ([0.0, 0.2], [0.8, 0.8])
    keep = controlnet_keep(10, starts, ends)
    assert keep.shape == (10, 2)
    assert keep[:, 0].tolist() == [1] * 8 + [0] * 2  # (i + 1) / 10 > 0.8 from i = 8
    assert keep[:, 1].tolist() == [0] * 2 + [1] * 6 + [0] * 2  # i / 10 < 0.2 for i < 2
    # diffusers' own lines, for odd step counts and bounds.
    for n, s, e in ((7, 0.1, 0.9), (3, 0.34, 0.66), (25, 0.5, 1.0)):
        ref = [1.0 - float(i / n < s or (i + 1) / n > e) for i in range(n)]
        assert controlnet_keep(n, [s], [e])[:, 0].tolist() == ref
    assert guidance_ranges(3, 0.1, 0.9) == ([0.1] * 3, [0.9] * 3)
    with pytest.raises(ValueError, match="smaller than control_guidance_end"):
        guidance_ranges(1, 0.5, 0.5)
    with pytest.raises(ValueError, match="larger than 1.0"):
        guidance_ranges(1, 0.0, 1.5)
    with pytest.raises(ValueError, match="2 values for 3 ControlNets"):
        guidance_ranges(3, [0.0, 0.1], [1.0, 1.0])


def test_control_image_matches_diffusers_processor() -> None:
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    ref = processor.preprocess(pil, height=48, width=64).numpy().transpose(0, 2, 3, 1)
    ours = prepare_control_image(pil, 48, 64, batch_size=3)
    assert ours.shape == (3, 48, 64, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[1], ref[0], atol=1e-6)
    arrays = rng.uniform(0, 1, (2, 21, 30, 3)).astype(np.float32)
    ref = processor.preprocess(arrays, height=48, width=64).numpy().transpose(0, 2, 3, 1)
    ours = prepare_control_image(arrays, 48, 64, batch_size=2, num_images_per_prompt=2)
    assert ours.shape == (4, 48, 64, 3)
    np.testing.assert_allclose(ours[::2], ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prepare_control_image(arrays * 2 - 1, 48, 64)
