"""Training: loss targets and weights against numpy, overfitting, EMA, LoRA (file round trip through sdjax's loader
and diffusers/PEFT), exact resume from an orbax checkpoint, the data-parallel step.

Compiling a train step is the slow part (tens of seconds on a busy CPU), so the tests share two compiled steps: a
full fine-tune on latents and a LoRA fine-tune on pixels (VAE encoding inside the step). The UNet is the tiny
reference SD1 one cut down to a single level (its attention lives in the mid block).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.convert.weights import flatten
from sdjax.parallel import DATA, data_mesh
from sdjax.samplers.schedules import SchedulerConfig, alphas_cumprod
from sdjax.train import (
    TrainConfig,
    checkpoint_manager,
    create_train_state,
    diffusion_loss,
    ema_update,
    export_diffusers,
    lora_state_dict,
    loss_randomness,
    make_train_step,
    merged_params,
    min_snr_weights,
    pipe_with_trained_params,
    restore_checkpoint,
    save_checkpoint,
    save_lora,
)

SCHEDULER = SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _trees_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


# --- the loss, against numpy -------------------------------------------------------------------------------------


class FakeUNet:
    """``apply`` like the UNet: prediction = w * noisy + t / 1000 + mean(context), cheap to mirror in numpy."""

    def apply(self, variables, sample, timesteps, context, **added):
        t = jnp.asarray(timesteps, jnp.float32)[:, None, None, None] / 1000.0
        return variables["params"]["w"] * sample + t + context.mean(axis=(1, 2))[:, None, None, None]

    @staticmethod
    def numpy(w, sample, timesteps, context):
        return w * sample + timesteps[:, None, None, None] / 1000.0 + context.mean(axis=(1, 2))[:, None, None, None]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_matches_numpy(prediction_type: str, gamma: float | None) -> None:
    scheduler = dataclasses.replace(SCHEDULER, prediction_type=prediction_type)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3, 3, 4)).astype(np.float32)
    context = rng.standard_normal((4, 5, 8)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    params = {"w": jnp.float32(0.3)}
    # Eagerly: six tiny compiles of the whole loss would cost more than op-by-op execution.
    loss, metrics = diffusion_loss(FakeUNet(), params, x0, context, key, scheduler, min_snr_gamma=gamma)

    t, noise = (np.asarray(v) for v in loss_randomness(key, x0.shape, 1000))
    assert t.dtype == np.int32 and 0 <= t.min() and t.max() < 1000 and len(set(t.tolist())) > 1
    a = alphas_cumprod(scheduler).astype(np.float64)[t][:, None, None, None]
    noisy = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    prediction = FakeUNet.numpy(0.3, noisy, t, context)
    target = {"epsilon": noise, "v_prediction": np.sqrt(a) * noise - np.sqrt(1 - a) * x0, "sample": x0}
    mse = ((prediction - target[prediction_type]) ** 2).mean(axis=(1, 2, 3))
    snr = a[:, 0, 0, 0] / (1 - a[:, 0, 0, 0])
    if gamma is None:
        weights = np.ones_like(snr)
    else:  # Hang et al. 2023, Min-SNR-gamma, written out per prediction type
        weights = {"epsilon": np.minimum(snr, gamma) / snr, "v_prediction": np.minimum(snr, gamma) / (snr + 1),
                   "sample": np.minimum(snr, gamma)}[prediction_type]
        assert not np.allclose(weights, 1.0)  # the weighting must matter for this draw
    np.testing.assert_allclose(float(loss), (weights * mse).mean(), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["mse"]), mse.mean(), rtol=2e-5)


def test_min_snr_weights_values() -> None:
    snr = jnp.asarray([0.0, 0.5, 5.0, 20.0])
    np.testing.assert_allclose(min_snr_weights(snr, 5.0, "epsilon"), [1.0, 1.0, 1.0, 0.25])
    np.testing.assert_allclose(min_snr_weights(snr, 5.0, "v_prediction"), [0.0, 0.5 / 1.5, 5 / 6, 5 / 21], rtol=1e-6)
    np.testing.assert_allclose(min_snr_weights(snr, 5.0, "sample"), [0.0, 0.5, 5.0, 5.0])


def test_offset_noise_shifts_whole_channels() -> None:
    key = jax.random.PRNGKey(3)
    t0, plain = loss_randomness(key, (3, 4, 4, 2), 1000)
    t1, offset = loss_randomness(key, (3, 4, 4, 2), 1000, offset_noise=0.1)
    np.testing.assert_array_equal(t0, t1)
    shift = np.asarray(offset - plain)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shift.shape), atol=1e-6)
    assert np.abs(shift).max() > 1e-3 and np.abs(shift).max() < 1.0


def test_ema_update_formula() -> None:
    ema = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(4.0)}}
    new = {"a": jnp.asarray([3.0, -2.0]), "b": {"c": jnp.asarray(0.0)}}
    out = ema_update(ema, new, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 1.0])
    np.testing.assert_allclose(out["b"]["c"], 3.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(lora_rank=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


# --- the tiny pipeline and two compiled steps ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import diffusers

    from tests.reference.tiny_pipelines import _unet, save

    folder = tmp_path_factory.mktemp("train") / "sd1"
    save("sd1", folder)
    # One UNet level: the fewest ops (compile time) that still has attention (mid block) and skip connections.
    small = diffusers.UNet2DConditionModel(**_unet(block_out_channels=(16,), down_block_types=("DownBlock2D",),
                                                   up_block_types=("UpBlock2D",)))
    small.save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    import sdjax

    return sdjax.load(model_dir)


def _ids(pipe, prompts: list[str]) -> dict[str, np.ndarray]:
    from sdjax.text import token_ids

    return {"text_encoder": token_ids(pipe, prompts, "text_encoder").ids}


FULL = TrainConfig(learning_rate=2e-3, ema_decay=0.9, max_grad_norm=1.0, seed=1)
LORA = TrainConfig(learning_rate=1e-2, lora_rank=2, lora_alpha=4.0, min_snr_gamma=5.0, offset_noise=0.05, seed=2)


@pytest.fixture(scope="module")
def full_step(pipe):
    return make_train_step(pipe, FULL)


@pytest.fixture(scope="module")
def latents_batch(pipe) -> dict:
    rng = np.random.default_rng(0)
    return {"latents": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
            "input_ids": _ids(pipe, ["a red cube", "a blue sphere"])}


def _run(step, state, batch, n: int, timesteps: list | None = None):
    losses = []
    for _ in range(n):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        if timesteps is not None:
            timesteps.append(float(m["timestep"]))
    return state, losses


def test_overfitting_one_batch_lowers_the_loss(pipe, full_step, latents_batch) -> None:
    start = create_train_state(pipe, FULL)
    initial = _numpy(start)
    timesteps: list[float] = []
    state, losses = _run(full_step, start, latents_batch, 30, timesteps)
    assert int(state.step) == 30 and all(np.isfinite(losses))
    assert len(set(timesteps)) > 20  # every step draws new timesteps (fold_in(key, step))
    # Re-measure the first 8 steps' losses (same timesteps and noise: step s draws from fold_in(key, s)) with
    # the trained params: rewinding the step counter replays the randomness.
    replay = []
    for s in range(8):
        copy = jax.tree.map(jnp.copy, state).replace(step=jnp.int32(s))
        replay.append(float(full_step(copy, latents_batch)[1]["loss"]))
    assert np.mean(replay) < 0.8 * np.mean(losses[:8]), (losses[:8], replay)
    # A fresh copy of the initial state replays the very first loss exactly: the step is deterministic.
    again = jax.device_put(initial, jax.tree.map(lambda x: x.sharding, state))
    assert full_step(again, latents_batch)[1]["loss"] == losses[0]


def test_ema_follows_the_params(pipe, full_step, latents_batch) -> None:
    state = create_train_state(pipe, FULL)
    before = _numpy(state.params)
    assert _trees_equal(state.ema_params, before)
    state, _ = full_step(state, latents_batch)
    after = _numpy(state.params)
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before, after)
    for got, want in zip(jax.tree.leaves(_numpy(state.ema_params)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not _trees_equal(after, before)
    # Generation params: the EMA copy by default, the raw params on request, in the pipeline's dtype.
    with_ema = pipe_with_trained_params(pipe, state)
    raw = merged_params(pipe, state, use_ema=False)
    kernel = ("conv_in", "kernel")
    np.testing.assert_array_equal(flatten(with_ema.params["unet"])[kernel], flatten(state.ema_params["unet"])[kernel])
    np.testing.assert_array_equal(flatten(raw["unet"])[kernel], flatten(after["unet"])[kernel])
    assert flatten(raw["unet"])[kernel].dtype == flatten(pipe.params["unet"])[kernel].dtype
    assert with_ema.params["vae"] is pipe.params["vae"]


def test_export_diffusers_round_trips(pipe, model_dir: Path, full_step, latents_batch, tmp_path: Path) -> None:
    import sdjax

    state, _ = full_step(create_train_state(pipe, FULL), latents_batch)
    trained = pipe_with_trained_params(pipe, state, use_ema=False)
    out = export_diffusers(trained, tmp_path / "export")
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = sdjax.load(out)
    assert _trees_equal(reloaded.params["unet"], trained.params["unet"])
    assert not _trees_equal(reloaded.params["unet"], pipe.params["unet"])
    assert _trees_equal(reloaded.params["text_encoder"], pipe.params["text_encoder"])


def test_resume_from_checkpoint_is_exact(pipe, full_step, latents_batch, tmp_path: Path) -> None:
    n = 6
    straight, _ = _run(full_step, create_train_state(pipe, FULL), latents_batch, n)
    manager = checkpoint_manager(tmp_path / "ckpt", max_to_keep=2)
    half, _ = _run(full_step, create_train_state(pipe, FULL), latents_batch, n // 2)
    assert save_checkpoint(manager, half) == n // 2
    del half
    # A new "process": everything rebuilt from the config, then the checkpoint restored into it.
    fresh = create_train_state(pipe, FULL)
    restored = restore_checkpoint(checkpoint_manager(tmp_path / "ckpt"), fresh)
    assert int(restored.step) == n // 2
    resumed, _ = _run(full_step, restored, latents_batch, n - n // 2)
    assert int(resumed.step) == int(straight.step) == n
    assert _trees_equal(resumed.params, straight.params)
    assert _trees_equal(resumed.ema_params, straight.ema_params)
    assert _trees_equal(resumed.opt_state, straight.opt_state)


def test_data_parallel_step_on_the_default_mesh(pipe, full_step, latents_batch) -> None:
    mesh = data_mesh()
    state = create_train_state(pipe, FULL)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.mesh.axis_names == (DATA,) and leaf.sharding.is_fully_replicated
    # Batches may arrive already sharded over "data"; the result is the same as from host arrays.
    sharded = jax.device_put(latents_batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA)))
    a, ma = full_step(jax.tree.map(jnp.copy, state), sharded)
    b, mb = full_step(state, latents_batch)
    assert float(ma["loss"]) == float(mb["loss"]) and _trees_equal(a.params, b.params)
    assert a.step.sharding.is_fully_replicated
    n = mesh.shape[DATA]
    if n > 1:
        odd = jax.tree.map(lambda x: x[:1], latents_batch)
        with pytest.raises(ValueError, match="multiple"):
            full_step(a, odd)
    with pytest.raises(ValueError, match="input_ids"):
        full_step(a, {"latents": latents_batch["latents"], "input_ids": {}})


# --- LoRA ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(pipe):
    base = _numpy(pipe.params)
    rng = np.random.default_rng(1)
    batch = {"pixels": rng.random((2, 32, 32, 3), dtype=np.float32),
             "input_ids": _ids(pipe, ["a photo of sks dog", "a photo of sks dog on grass"])}
    state = create_train_state(pipe, LORA)
    initial = _numpy(state.params)
    step = make_train_step(pipe, LORA)
    state, losses = _run(step, state, batch, 3)
    return base, initial, state, losses


def test_lora_trains_only_the_factors(pipe, lora_run) -> None:
    base, initial, state, losses = lora_run
    assert all(np.isfinite(losses))
    assert _trees_equal(pipe.params, base)  # frozen base weights: untouched
    assert set(state.params) == {"unet"}
    leaves = flatten(state.params["unet"])
    assert {p[-1] for p in leaves} == {"lora_A", "lora_B"}
    modules = sorted({"/".join(p[-3:-1]) for p in leaves})
    assert modules == [f"{a}/{m}" for a in ("attn1", "attn2") for m in ("to_k", "to_out_0", "to_q", "to_v")]
    init = flatten(initial["unet"])
    assert all(not np.any(v) for p, v in init.items() if p[-1] == "lora_B")  # B starts at zero (as PEFT)
    assert all(not np.array_equal(v, init[p]) for p, v in leaves.items() if p[-1] == "lora_B")
    # Merged generation params differ from the base exactly at the factored kernels.
    merged, flat_base = flatten(merged_params(pipe, state)["unet"]), flatten(base["unet"])
    changed = {p[:-1] for p in flat_base if not np.array_equal(merged[p], flat_base[p])}
    assert changed == {p[:-1] for p in leaves}


def test_saved_lora_loads_through_convert_lora(pipe, lora_run, tmp_path: Path) -> None:
    from sdjax.convert.lora import apply_lora

    _, _, state, _ = lora_run
    path = save_lora(state, tmp_path / "lora.safetensors")
    keys = set(lora_state_dict(state.params))
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"
    assert key in keys and len(keys) == 16
    loaded = apply_lora(pipe, [(path, 1.0)])
    expected = merged_params(pipe, state)
    for (p, got), want in zip(flatten(loaded.params["unet"]).items(), flatten(expected["unet"]).values(),
                                  strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg="/".join(p))


def test_saved_lora_loads_in_diffusers(pipe, model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import diffusers

    # Random non-zero factors (a trained B is tiny after 3 steps) and alpha != rank: the scale must survive.
    state = create_train_state(pipe, LORA)
    rng = np.random.default_rng(2)
    factors = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), _numpy(state.params))
    state = state.replace(params=factors)
    path = save_lora(state, tmp_path / "lora.safetensors")
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    torch_pipe.load_lora_weights(str(path))
    torch_pipe.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v.detach().numpy() for k, v in torch_pipe.unet.state_dict().items()}
    ours = flatten(merged_params(pipe, state)["unet"])
    base = flatten(pipe.params["unet"])
    for module in ("attn1.to_q", "attn2.to_out.0"):
        flax_path = ("mid_block", "attentions_0", "transformer_blocks_0", *module.replace(".0", "_0").split("."),
                     "kernel")
        torch_weight = fused[f"mid_block.attentions.0.transformer_blocks.0.{module}.weight"]
        assert not np.allclose(ours[flax_path], base[flax_path])
        np.testing.assert_allclose(torch_weight.T, ours[flax_path], rtol=1e-5, atol=1e-6)


def test_text_encoder_lora_factors_round_trip(pipe) -> None:
    from sdjax.convert.lora import apply_lora

    config = dataclasses.replace(LORA, train_text_encoder=True)
    state = create_train_state(pipe, config)
    assert set(state.params) == {"unet", "text_encoder"}
    rng = np.random.default_rng(3)
    state = state.replace(params=jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1,
                                              _numpy(state.params)))
    sd = lora_state_dict(state.params)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    loaded = apply_lora(pipe, [(sd, state.lora_alpha / 2)])  # a state dict has no alpha: scale via the weight
    expected = merged_params(pipe, state)
    for component in ("unet", "text_encoder"):
        for got, want in zip(jax.tree.leaves(loaded.params[component]), jax.tree.leaves(expected[component]),
                             strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
