"""T2I-Adapter (full, full XL, light) parity with diffusers, MultiAdapter sums, image preparation, keep."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.models.config import ConfigError
from sdjax.models.t2i_adapter import T2IAdapterConfig, avg_pool_ceil, pixel_unshuffle
from sdjax.t2i_adapter import adapter_keep, load_t2i_adapter, prepare_adapter_image, t2i_adapter_residuals
from tests.reference.control_models import randomise_fan_in

# Toy widths with each type's structure; SD1-like ones match tests/reference/unet_configs.SD1 (32, 64) at 8x.
CONFIGS = {
    "full": dict(in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=8,
                 adapter_type="full_adapter"),
    "full_xl": dict(in_channels=1, channels=(16, 32, 64, 64), num_res_blocks=2, downscale_factor=16,
                    adapter_type="full_adapter_xl"),
    "light": dict(in_channels=3, channels=(16, 32, 32), num_res_blocks=2, downscale_factor=8,
                  adapter_type="light_adapter"),
}


def build(name: str, seed: int):
    from diffusers import T2IAdapter

    model = T2IAdapter(**CONFIGS[name]).eval()
    randomise_fan_in(model, seed)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name: str, tmp_path, fast_compile) -> None:
    torch_adapter = build(name, seed=len(name))
    torch_adapter.save_pretrained(tmp_path)
    adapter = load_t2i_adapter(tmp_path)
    cfg = adapter.config
    rng = np.random.default_rng(0)
    # Not a multiple of the adapter's total downscale: the ceil-mode pooling's edge windows are exercised.
    h, w = 3 * cfg.downscale_factor, 5 * cfg.downscale_factor
    image = rng.uniform(0, 1, (2, h, w, cfg.in_channels)).astype(np.float32)
    with torch.inference_mode():
        ref = torch_adapter(torch.from_numpy(image.transpose(0, 3, 1, 2).copy()))
    out = jax.jit(adapter.__call__)(image)
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref, strict=True)):
        b = b.numpy().transpose(0, 2, 3, 1)
        assert a.shape == b.shape, f"{name} feature {i}: {a.shape} != {b.shape}"
        scale = float(np.abs(b).max())
        assert scale > 0.1
        assert float(np.abs(np.asarray(a) - b).max()) <= 1e-4 * max(1.0, scale), f"{name} feature {i}"


def test_multi_adapter_weighted_sum(tmp_path) -> None:
    from diffusers import MultiAdapter

    torch_a, torch_b = build("full", 1), build("full", 2)
    torch_a.save_pretrained(tmp_path / "a")
    torch_b.save_pretrained(tmp_path / "b")
    adapters = [load_t2i_adapter(tmp_path / "a"), load_t2i_adapter(tmp_path / "b")]
    rng = np.random.default_rng(1)
    images = [rng.uniform(0, 1, (1, 16, 24, 3)).astype(np.float32) for _ in range(2)]
    with torch.inference_mode():
        ref = MultiAdapter([torch_a, torch_b])(
            [torch.from_numpy(i.transpose(0, 3, 1, 2).copy()) for i in images], [0.7, 0.4])
    out = t2i_adapter_residuals(adapters, images, [0.7, 0.4])
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    single = t2i_adapter_residuals(adapters[:1], images[:1], [0.5])
    np.testing.assert_allclose(np.asarray(single[0]), 0.5 * np.asarray(adapters[0](images[0])[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="scales"):
        t2i_adapter_residuals(adapters, images, [1.0])


def test_layout_helpers_match_torch() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
    ref = torch.nn.PixelUnshuffle(4)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_unshuffle(x, 4)), ref.transpose(0, 2, 3, 1))
    odd = x[:, :7, :11]
    ref = torch.nn.AvgPool2d(2, 2, ceil_mode=True)(torch.from_numpy(odd.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(avg_pool_ceil(odd)), ref.transpose(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(ValueError, match="downscale factor"):
        pixel_unshuffle(x[:, :7], 4)


def test_image_preparation_keep_and_config_errors() -> None:
    rng = np.random.default_rng(3)
    sketch = Image.fromarray(rng.integers(0, 256, (30, 41), dtype=np.uint8), mode="L")
    out = prepare_adapter_image(sketch, 32, 48)
    ref = np.asarray(sketch.resize((48, 32), resample=Image.LANCZOS), np.float32) / 255.0
    assert out.shape == (1, 32, 48, 1)
    np.testing.assert_array_equal(out[0, ..., 0], ref)
    assert prepare_adapter_image(Image.fromarray(np.zeros((5, 5, 3), np.uint8)), 16, 16).shape == (1, 16, 16, 3)
    assert adapter_keep(10, 0.35).tolist() == [1.0] * 3 + [0.0] * 7  # i < int(10 * 0.35)
    assert adapter_keep(4).tolist() == [1.0] * 4
    with pytest.raises(ConfigError, match="adapter_type"):
        T2IAdapterConfig.from_dict({"adapter_type": "sketch"})
