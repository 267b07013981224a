"""IP-Adapter: the Flax CLIP vision tower against transformers, and a plain + a Plus adapter (tiny random weights
in the original file layouts) loaded by diffusers' ``pipe.load_ip_adapter`` and by sdjax, compared on the image
embeddings and on the UNet output given the same embeddings."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.convert.safe_load import CheckpointError
from sdjax.ip_adapter import (
    cross_attention_paths,
    encode_image,
    ip_adapter_tokens,
    load_image_encoder,
    load_ip_adapter,
    with_ip_adapters,
)
from sdjax.models.clip_vision import VIT_BIGG_14, VIT_H_14, CLIPVisionConfig
from tests.reference.control_models import randomise_fan_in

VISION = dict(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=3, num_attention_heads=4,
              image_size=30, patch_size=6, hidden_act="gelu")
PLUS_HIDDEN, PLUS_QUERIES = 64, 5  # one 64-wide head, as diffusers reads heads = to_q rows // 64


def build_image_encoder(folder) -> torch.nn.Module:
    from transformers import CLIPVisionConfig as TorchConfig
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(TorchConfig(**VISION)).eval()
    randomise_fan_in(model, seed=4)
    model.save_pretrained(folder)
    return model


def _rand(gen: torch.Generator, *shape: int, kind: str = "kernel") -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if kind == "scale":
        return 1.0 + 0.2 * noise
    if kind == "bias":
        return 0.2 * noise
    return noise / shape[-1] ** 0.5


def ip_adapter_state(unet, plus: bool, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny IP-Adapter in the original layout: ``image_proj`` (ImageProjection or the Resampler) and
    ``ip_adapter.{1,3,5,..}.to_k_ip/to_v_ip`` for each cross-attention in ``unet.attn_processors`` order."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    if plus:
        h = PLUS_HIDDEN
        proj = {"latents": torch.randn(1, PLUS_QUERIES, h, generator=gen) / h**0.5,
                "proj_in.weight": _rand(gen, h, VISION["hidden_size"]), "proj_in.bias": _rand(gen, h, kind="bias"),
                "proj_out.weight": _rand(gen, cross, h), "proj_out.bias": _rand(gen, cross, kind="bias"),
                "norm_out.weight": _rand(gen, cross, kind="scale"), "norm_out.bias": _rand(gen, cross, kind="bias")}
        for i in range(4):
            for norm in ("0.norm1", "0.norm2", "1.0"):
                proj[f"layers.{i}.{norm}.weight"] = _rand(gen, h, kind="scale")
                proj[f"layers.{i}.{norm}.bias"] = _rand(gen, h, kind="bias")
            proj[f"layers.{i}.0.to_q.weight"] = _rand(gen, 64, h)
            proj[f"layers.{i}.0.to_kv.weight"] = _rand(gen, 128, h)
            proj[f"layers.{i}.0.to_out.weight"] = _rand(gen, h, 64)
            proj[f"layers.{i}.1.1.weight"] = _rand(gen, 4 * h, h)
            proj[f"layers.{i}.1.3.weight"] = _rand(gen, h, 4 * h)
    else:
        width = VISION["projection_dim"]
        proj = {"proj.weight": _rand(gen, 4 * cross, width), "proj.bias": _rand(gen, 4 * cross, kind="bias"),
                "norm.weight": _rand(gen, cross, kind="scale"), "norm.bias": _rand(gen, cross, kind="bias")}
    attn = {}
    key_id = 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        attn[f"{key_id}.to_k_ip.weight"] = _rand(gen, hidden, cross)
        attn[f"{key_id}.to_v_ip.weight"] = _rand(gen, hidden, cross)
        key_id += 2
    return {"image_proj": proj, "ip_adapter": attn}


def test_clip_vision_matches_transformers(tmp_path, fast_compile) -> None:
    torch_model = build_image_encoder(tmp_path)
    encoder = load_image_encoder(tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 30, 30, 3), dtype=np.float32)
    with torch.inference_mode():
        ref = torch_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    out = jax.jit(lambda p, x: encoder.module.apply({"params": p}, x))(encoder.params, pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
    for what, a, b in (("image_embeds", out.image_embeds, ref.image_embeds),
                       ("penultimate hidden states", out.hidden_states[-2], ref.hidden_states[-2]),
                       ("last hidden state", out.last_hidden_state, ref.last_hidden_state)):
        b = b.numpy()
        scale = float(np.abs(b).max())
        assert scale > 0.1 and float(np.abs(np.asarray(a) - b).max()) <= 1e-4 * max(1.0, scale), what


@pytest.mark.parametrize("config", [VIT_H_14, VIT_BIGG_14], ids=["vit_h_14", "vit_bigg_14"])
def test_released_encoder_configs_convert_key_for_key(config: CLIPVisionConfig) -> None:
    from transformers import CLIPVisionConfig as TorchConfig
    from transformers import CLIPVisionModelWithProjection

    from sdjax.convert.clip_vision import convert_clip_vision

    raw = {k: getattr(config, k) for k in VISION} | {"num_channels": 3}
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(TorchConfig(**raw))
    zeros = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zeros, v.shape) for k, v in model.state_dict().items()}
    params = convert_clip_vision(state, config)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())


def test_ip_adapters_match_diffusers_load_ip_adapter(tiny, tmp_path, fast_compile) -> None:
    """A plain adapter (.safetensors) and a Plus adapter (.bin) at once, with their own scales: diffusers'
    pipe.load_ip_adapter + set_ip_adapter_scale and its image embeddings vs sdjax's."""
    from safetensors.torch import save_file

    t = tiny("sd1")
    pipe = t.fresh_torch()
    models = tmp_path / "models"
    torch_encoder = build_image_encoder(models / "image_encoder")
    plain, plus = ip_adapter_state(pipe.unet, False, 1), ip_adapter_state(pipe.unet, True, 2)
    save_file({f"{part}.{k}": v.contiguous() for part, d in plain.items() for k, v in d.items()},
              str(models / "ip-adapter_tiny.safetensors"))
    torch.save(plus, models / "ip-adapter-plus_tiny.bin")
    pipe.load_ip_adapter(str(tmp_path), subfolder="models", image_encoder_folder="image_encoder",
                         weight_name=["ip-adapter_tiny.safetensors", "ip-adapter-plus_tiny.bin"])
    scales = [0.7, 0.4]
    pipe.set_ip_adapter_scale(scales)
    assert pipe.image_encoder is not None and torch_encoder is not None

    config = t.pipe.unet.config
    encoder = load_image_encoder(models / "image_encoder")
    adapters = [load_ip_adapter(models / "ip-adapter_tiny.safetensors", config, image_encoder=encoder, scale=0.7),
                load_ip_adapter(models / "ip-adapter-plus_tiny.bin", config, image_encoder=encoder, scale=0.4)]
    assert [a.plus for a in adapters] == [False, True] and [a.num_tokens for a in adapters] == [4, PLUS_QUERIES]

    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (41, 37, 3), dtype=np.uint8)) for _ in range(2)]
    with torch.inference_mode():
        ref_embeds = pipe.prepare_ip_adapter_image_embeds(images, None, "cpu", 1, True)
    embeds = []
    for adapter, image in zip(adapters, images, strict=True):
        cond, uncond = encode_image(adapter, image)
        embeds.append(np.concatenate([uncond, cond])[:, None])  # (CFG batch, one image, ...), uncond first
    for i, (a, b) in enumerate(zip(embeds, ref_embeds, strict=True)):
        b = b.numpy()
        assert a.shape == b.shape, f"adapter {i} embeds: {a.shape} != {b.shape}"
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())), err_msg=f"adapter {i}")

    batch = 2
    sample = rng.standard_normal((batch, 6, 10, 4), dtype=np.float32)
    timesteps = rng.uniform(0, 1000, batch).astype(np.float32)
    context = rng.standard_normal((batch, 9, config.cross_attention_dims[0]), dtype=np.float32)
    with torch.inference_mode():
        ref = pipe.unet(torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()), torch.from_numpy(timesteps),
                        torch.from_numpy(context), added_cond_kwargs={"image_embeds": ref_embeds}).sample
        pipe.set_ip_adapter_scale([0.0, 0.0])
        ref_off = pipe.unet(torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()), torch.from_numpy(timesteps),
                            torch.from_numpy(context), added_cond_kwargs={"image_embeds": ref_embeds}).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert float(np.abs(ref - ref_off.numpy().transpose(0, 2, 3, 1)).max()) > 1e-2  # the adapters matter

    params = with_ip_adapters(t.pipe.params["unet"], adapters)
    assert "to_k_ip_1" not in t.pipe.params["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]

    def run(p, x, ts, c, e, s):
        tokens = [ip_adapter_tokens(a, emb) for a, emb in zip(adapters, e, strict=True)]
        return t.pipe.unet.apply({"params": p}, x, ts, c, ip_adapter_tokens=tokens, ip_adapter_scales=s)

    out = np.asarray(jax.jit(run)(params, sample, timesteps, context, embeds, np.array(scales, np.float32)))
    scale = float(np.abs(ref).max())
    assert float(np.abs(out - ref).max()) <= 1e-4 * max(1.0, scale)


def test_paths_order_and_errors(tiny, tmp_path) -> None:
    t = tiny("sd1")
    from sdjax.convert.weights import torch_key_to_path

    paths = cross_attention_paths(t.pipe.unet.config)
    expected = [torch_key_to_path(name.removesuffix(".processor")) for name in t.torch_pipe.unet.attn_processors
                if name.endswith("attn2.processor")]
    assert paths == expected and paths[-1][0] == "mid_block"  # diffusers' order: down, up, then mid
    bad = tmp_path / "not_ip.safetensors"
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        load_ip_adapter(bad, t.pipe.unet.config)
    state = ip_adapter_state(t.fresh_torch().unet, False, 0)
    last = 2 * len(paths) - 1
    del state["ip_adapter"][f"{last}.to_k_ip.weight"], state["ip_adapter"][f"{last}.to_v_ip.weight"]
    short = tmp_path / "short.safetensors"
    save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(short))
    with pytest.raises(CheckpointError, match="another model family"):
        load_ip_adapter(short, t.pipe.unet.config)
    with pytest.raises(ValueError, match="ip_adapter_scales"):
        t.pipe.unet.apply({"params": t.pipe.params["unet"]}, np.zeros((1, 8, 8, 4), np.float32), 1.0,
                          np.zeros((1, 3, 32), np.float32), ip_adapter_tokens=[np.zeros((1, 4, 32), np.float32)],
                          ip_adapter_scales=[1.0, 2.0])
