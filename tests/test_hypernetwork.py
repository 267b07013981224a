"""A1111 hypernetworks against tests/reference/hypernetwork.py (PyTorch, written from the format's description and
installed as a diffusers attention processor) on the tiny SD1 model: UNet outputs and generated images.

The tiny UNet's text width (32) is also its first block's channel width, so a 32 entry runs in self- and
cross-attention; the 64 entry runs in the second block's self-attention."""

from __future__ import annotations

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sdjax.convert.hypernetwork import HypernetworkError, read_hypernetwork
from tests.conftest import HEIGHT, PROMPTS, STEPS, WIDTH, assert_differ, assert_images_close, noise, set_scheduler
from tests.reference import hypernetwork as ref

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hypernetworks")
    # ReLU, dropout after the hidden layer (older files: use_dropout + last_layer_dropout, no dropout_structure),
    # so the second Linear is linear.3.
    first = ref.make([32, 64], seed=1, activation="relu", dropout=[0, 0.3, 0])
    first_file = ref.save(folder / "first.pt", first, layer_structure=[1, 2, 1], activation_func="relu",
                          is_layer_norm=False, use_dropout=True, last_layer_dropout=True, activate_output=False,
                          name="first", step=100, sd_checkpoint=None, sd_checkpoint_name="model")
    # "swish" (Hardswish), layer norm after every Linear, activation after the last one too, 1 -> 1.5 -> 1 -> 1.
    second = ref.make([32], seed=2, layer_structure=(1, 1.5, 1, 1), activation="swish", layer_norm=True,
                      activate_output=True)
    second_file = ref.save(folder / "second.pt", second, layer_structure=[1, 1.5, 1, 1], activation_func="swish",
                           is_layer_norm=True, activate_output=True, dropout_structure=[0, 0, 0, 0])
    return {"first": (first_file, first), "second": (second_file, second)}


def test_read_hypernetwork(files):
    spec, params = read_hypernetwork(files["first"][0])
    assert spec.name == "first" and spec.widths == (32, 64) and spec.activation == "relu"
    assert sorted(params[64]["k"]) == ["linear_0", "linear_3"]  # linear.1 ReLU, linear.2 Dropout
    assert params[64]["k"]["linear_0"]["kernel"].shape == (64, 128)
    spec, params = read_hypernetwork(files["second"][0])
    assert spec.layer_norm and spec.activate_output and sorted(params[32]["v"]) == [
        "linear_0", "linear_2", "linear_3", "linear_5", "linear_6", "linear_8"]


def unet_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    t = np.array([999.0, 321.0], np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return sample, t, context


@functools.lru_cache
def jitted(unet):
    return jax.jit(lambda params, *args: unet.apply({"params": params}, *args))


def sdjax_unet(pipe, sample, t, context):
    out = jitted(pipe.unet)(pipe.params["unet"], jnp.asarray(sample.transpose(0, 2, 3, 1)), t, jnp.asarray(context))
    return np.asarray(out).transpose(0, 3, 1, 2)


def assert_close(actual, expected, tol=1e-4):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * max(1.0, np.abs(expected).max()))


def test_unet_parity(tiny, files):
    model = tiny("sd1")
    pipe = model.pipe.with_hypernetwork(files["first"][0], strength=0.8).with_hypernetwork(
        files["second"][0], strength=1.3)
    sample, t, context = unet_inputs()
    torch_unet = model.fresh_torch().unet
    ref.install(torch_unet, [(files["first"][1], 0.8), (files["second"][1], 1.3)])
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    actual = sdjax_unet(pipe, sample, t, context)
    assert_close(actual, expected)
    plain = sdjax_unet(model.pipe, sample, t, context)
    assert np.abs(actual - plain).max() > 0.05 * np.abs(plain).max()  # the hypernetworks did something
    # The original pipeline is untouched; strength 0 is no hypernetwork (and strength is a param: no recompile).
    assert model.pipe.unet.hypernetworks == ()
    off = model.pipe.with_hypernetwork(files["first"][0], strength=0.0).with_hypernetwork(files["second"][0], 0.0)
    assert_close(sdjax_unet(off, sample, t, context), plain, 1e-6)
    assert jitted.cache_info().currsize == 2


def test_generated_image_parity(tiny, files):
    model = tiny("sd1")
    pipe = model.pipe.with_hypernetwork(files["first"][0], strength=1.0)
    torch_pipe = set_scheduler(model, EulerDiscreteScheduler, model.fresh_torch())
    ref.install(torch_pipe.unet, [(files["first"][1], 1.0)])
    latents = noise(2)
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=7.5,
                              latents=torch.from_numpy(latents), output_type="np").images
    actual = pipe.text_to_image(PROMPTS, sampler="euler", num_steps=STEPS, guidance_scale=7.5, latents=latents,
                                height=HEIGHT, width=WIDTH)
    assert_images_close(actual, expected, "hypernetwork")
    plain = set_scheduler(model, EulerDiscreteScheduler, model.fresh_torch())
    with torch.no_grad():
        plain = plain(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=7.5,
                      latents=torch.from_numpy(latents), output_type="np").images
    assert_differ(actual, plain, "the hypernetwork")


def test_errors(tiny, files, tmp_path):
    pipe = tiny("sd1").pipe
    other = ref.save(tmp_path / "sd2.pt", ref.make([1024], seed=3, std=0.01), layer_structure=[1, 2, 1])
    with pytest.raises(HypernetworkError, match=r"context widths \[1024\].*widths \[32, 64\]"):
        pipe.with_hypernetwork(other)
    odd = ref.save(tmp_path / "odd.pt", ref.make([32], seed=3), layer_structure=[1, 2, 1], activation_func="glu")
    with pytest.raises(HypernetworkError, match="unsupported activation_func 'glu'"):
        pipe.with_hypernetwork(odd)
    # Metadata that does not match the weights (the file was made with ReLU: its second Linear is linear.2).
    wrong = ref.save(tmp_path / "wrong.pt", ref.make([32], seed=3, activation="relu"), layer_structure=[1, 2, 1],
                     activation_func="linear")
    with pytest.raises(HypernetworkError, match=r"missing \['linear.1.bias', 'linear.1.weight'\]"):
        pipe.with_hypernetwork(wrong)
    with pytest.raises(HypernetworkError, match="no context widths"):
        pipe.with_hypernetwork(ref.save(tmp_path / "empty.pt", {}, name="x"))
    with pytest.raises(HypernetworkError, match="no such file"):
        pipe.with_hypernetwork(tmp_path / "missing.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_are_read_weights_only(tiny, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({32: ({}, {}), "payload": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(HypernetworkError):
        tiny("sd1").pipe.with_hypernetwork(path)
    assert "this must never run" not in capsys.readouterr().out
