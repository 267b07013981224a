"""A1111's extra-network tags in the prompt (``<lora:name:0.8>``, ``<hypernet:name:1.0>``): found by file stem in
the folders given, applied as ``with_lora`` / ``with_hypernetwork`` by hand would be, removed from the text the
encoder sees, recorded as A1111 records them; every bad tag an error before any work."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import numpy as np
import pytest

from sdjax import extra_networks
from sdjax.hashes import lora_short_hash
from tests.conftest import HEIGHT, WIDTH, assert_differ
from tests.reference import hypernetwork as ref
from tests.reference import lora_writer
from tests.test_lora import SD1_KOHYA_A, _kohya


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("networks")
    sd1 = tiny("sd1")
    lora_writer.save_safetensors(_kohya(sd1, SD1_KOHYA_A, rank=4, alpha=2.0, seed=21),
                                 root / "loras" / "styles" / "ink.safetensors")  # found in a subfolder
    lora_writer.save_safetensors(_kohya(sd1, SD1_KOHYA_A, rank=2, alpha=None, seed=22),
                                 root / "loras" / "b9f1.safetensors", metadata={"ss_output_name": "watercolor"})
    (root / "hypernets").mkdir()
    ref.save(root / "hypernets" / "anime.pt", ref.make([32, 64], seed=3, activation="relu"),
             layer_structure=[1, 2, 1], activation_func="relu", activate_output=False)
    return {"lora": root / "loras", "hypernet": root / "hypernets"}


def _same_params(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def test_tags_apply_what_with_lora_and_with_hypernetwork_apply(tiny, folders) -> None:
    pipe = tiny("sd1").pipe
    ink = folders["lora"] / "styles" / "ink.safetensors"
    applied = extra_networks.apply(pipe, ["a cat <lora:ink:0.7>, <hypernet:anime:0.5> sitting", "a dog <lora:x:9>"],
                                   lora_dir=folders["lora"], hypernetwork_dir=str(folders["hypernet"]))
    # Every prompt loses its tags; the first prompt's tags apply to the batch (A1111's parse_prompts).
    assert applied.prompts == ["a cat ,  sitting", "a dog "]
    assert [(n.kind, n.name, n.te, n.unet) for n in applied.networks] == [("lora", "ink", 0.7, 0.7),
                                                                          ("hypernet", "anime", 0.5, 0.5)]
    by_hand = pipe.with_lora(ink, 0.7).with_hypernetwork(folders["hypernet"] / "anime.pt", strength=0.5)
    assert applied.pipe.unet == by_hand.unet and _same_params(applied.pipe.params, by_hand.params)
    assert extra_networks.apply(pipe, "a cat <lora:ink:0.7>, <hypernet:anime:0.5> sitting", lora_dir=folders["lora"],
                                hypernetwork_dir=folders["hypernet"]).pipe is applied.pipe  # merged once
    # A1111's <lora:name:te:unet> (and te= / unet=), and its alias: the file's ss_output_name.
    split = extra_networks.apply(pipe, "<lora:ink:0.5:1.5>", lora_dir=folders["lora"]).pipe
    assert _same_params(split.params["unet"], pipe.with_lora(ink, 1.5).params["unet"])
    assert _same_params(split.params["text_encoder"], pipe.with_lora(ink, 0.5).params["text_encoder"])
    named = extra_networks.apply(pipe, "<lora:ink:unet=1.5:te=0.5>", lora_dir=folders["lora"]).pipe
    assert _same_params(named.params, split.params)
    alias = extra_networks.apply(pipe, "<lora:watercolor>", lora_dir=folders["lora"])
    assert alias.networks[0].path.name == "b9f1.safetensors"
    assert _same_params(alias.pipe.params, pipe.with_lora(folders["lora"] / "b9f1.safetensors", 1.0).params)


def test_generation_with_tags_equals_by_hand(tiny, folders, fast_compile) -> None:
    pipe = tiny("sd1").pipe
    call = dict(num_steps=2, height=HEIGHT, width=WIDTH, sampler="euler", seed=4, guidance_scale=5.0)
    got = pipe.text_to_image(["a red cat <lora:ink:0.8> on a chair"] * 2, lora_dir=folders["lora"], **call)
    expected = pipe.with_lora(folders["lora"] / "styles" / "ink.safetensors", 0.8).text_to_image(
        ["a red cat  on a chair"] * 2, **call)  # the tag gone from the text, its two spaces kept (A1111)
    np.testing.assert_array_equal(got, expected)
    assert_differ(got, pipe.text_to_image(["a red cat  on a chair"] * 2, **call), "the LoRA tag")


def test_a1111_lora_hash(folders) -> None:
    path = folders["lora"] / "styles" / "ink.safetensors"
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert lora_short_hash(path) == hashlib.sha256(data[header:]).hexdigest()[:12]  # kohya's addnet hash
    given = lora_writer.save_safetensors({"x": np.zeros(2, np.float32)}, folders["lora"].parent / "h.safetensors",
                                         metadata={"sshs_model_hash": "abcdef0123456789"})
    assert lora_short_hash(given) == "abcdef012345"


def test_bad_tags_fail_before_any_work(tiny, folders, tmp_path, monkeypatch) -> None:
    import sdjax.generation

    def no_run(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(sdjax.generation, "run", no_run)
    pipe = tiny("sd1").pipe
    twin = tmp_path / "twin"
    lora_writer.save_safetensors({"x": np.zeros(2, np.float32)}, twin / "a" / "same.safetensors")
    lora_writer.save_safetensors({"x": np.zeros(2, np.float32)}, twin / "b" / "same.pt")
    cases = [
        ("<lora:ink:0.5>", {}, r"the prompt has <lora:ink>: give lora_dir="),
        ("<lora:nope:0.5>", {"lora_dir": folders["lora"]}, "no nope.safetensors/.pt/.ckpt in lora_dir"),
        ("<hypernet:anime>", {"lora_dir": folders["lora"]}, "give hypernetwork_dir="),
        ("<hypernet:ink>", {"hypernetwork_dir": folders["lora"]}, r"no ink.pt in hypernetwork_dir"),
        ("<lora:ink:strong>", {"lora_dir": folders["lora"]}, "'strong' is not a number"),
        ("<lora:ink:1:dyn=4>", {"lora_dir": folders["lora"]}, "unsupported argument"),
        ("<lyco:ink:1>", {"lora_dir": folders["lora"]}, "<lora:...> and <hypernet:...> tags only"),
        ("<lora:same>", {"lora_dir": twin}, "several files are named same"),
        ("<lora:ink>", {"lora_dir": tmp_path / "missing"}, "is not a folder"),
    ]
    for prompt, folders_given, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.text_to_image(f"a cat {prompt}", num_steps=2, **folders_given)
    with pytest.raises(ValueError, match="give lora_dir="):  # the hires path and the image tasks too
        pipe.text_to_image("<lora:ink>", hires_scale=2.0)
    with pytest.raises(ValueError, match="give lora_dir="):
        pipe.image_to_image("<lora:ink>", np.zeros((HEIGHT, WIDTH, 3), np.float32))


def test_a_bad_request_reads_no_network(tiny, folders, monkeypatch) -> None:
    """A request that fails its checks (here a bad sampler) is refused before its tags' weights are read."""
    import sdjax.convert.hypernetwork
    import sdjax.convert.lora

    def no_read(*args, **kwargs):
        raise AssertionError("network weights read")

    for module, name in ((sdjax.convert.lora, "merged_lora_params"), (sdjax.convert.lora, "lora_deltas"),
                         (sdjax.convert.hypernetwork, "apply_hypernetwork")):
        monkeypatch.setattr(module, name, no_read, raising=True)
    pipe = tiny("sd1").pipe
    tags = "a cat <lora:ink:0.5> <hypernet:anime>"
    dirs = dict(lora_dir=folders["lora"], hypernetwork_dir=folders["hypernet"])
    with pytest.raises(ValueError, match="sampler"):
        pipe.text_to_image(tags, num_steps=2, sampler="no-such-sampler", **dirs)
    with pytest.raises(ValueError, match="sampler"):
        pipe.text_to_image(tags, num_steps=2, sampler="no-such-sampler", hires_scale=1.5, **dirs)


def test_symlinked_folders_are_searched(folders, tmp_path) -> None:
    """As A1111's ``os.walk(..., followlinks=True)``; a link back up the tree does not loop."""
    root = tmp_path / "loras"
    root.mkdir()
    (root / "shared").symlink_to(folders["lora"] / "styles", target_is_directory=True)
    (root / "up").symlink_to(root, target_is_directory=True)
    assert extra_networks.find("lora", "ink", root) == root / "shared" / "ink.safetensors"


def test_tags_outside_the_task_methods_are_refused() -> None:
    """Only the Pipeline task methods apply tags; a request built elsewhere (batch jobs, generation.run) would
    encode them as text, so it is refused, naming the prompt."""
    from sdjax.generation import Request

    with pytest.raises(ValueError, match=r"prompt 'a cat <lora:ink:0.8>' has extra-network tags"):
        Request.build("text", ["a dog", "a cat <lora:ink:0.8>"])
    assert Request.build("text", "a <3 cat").prompts == ("a <3 cat",)  # not a tag
