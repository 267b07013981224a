"""Textual inversion: token ids and prompt embeddings against diffusers' load_textual_inversion (A1111 .pt and
.safetensors, diffusers learned_embeds, SDXL clip_l/clip_g pairs), the original pipeline left alone, and errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from sdjax.convert.embeddings import EmbeddingError, apply_embeddings, expand_prompt  # noqa: E402
from sdjax.tokenizer import tokenize  # noqa: E402
from tests.conftest import Tiny  # noqa: E402
from tests.reference import lora_writer  # noqa: E402

WIDTH = 32  # the tiny CLIP encoders' hidden size
PROMPT = "a photo of {} on a beach"


@pytest.fixture(scope="module")
def sd1(tiny) -> Tiny:
    return tiny("sd1")


@pytest.fixture(scope="module")
def sdxl(tiny) -> Tiny:
    return tiny("sdxl")


def _vectors(n: int, seed: int, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.5, (n, width)).astype(np.float32)


def _sdjax_ids(pipe: Any, prompt: str) -> dict[str, np.ndarray]:
    return {name: tokenize(enc.tokenizer, [expand_prompt(pipe, prompt, name)])[0]
            for name, enc in pipe.text_encoders.items()}


def _encode(pipe: Any, ids: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """diffusers' prompt embeddings: SD1 the last normed state; SDXL both penultimate states and the pooled
    projection."""
    outs = {name: enc.module.apply({"params": pipe.params[name]}, ids[name])
            for name, enc in pipe.text_encoders.items()}
    if not pipe.is_sdxl:
        return outs["text_encoder"].last_hidden_state, None
    context = jnp.concatenate([out.hidden_states[-2] for out in outs.values()], axis=-1)
    return context, outs["text_encoder_2"].text_embeds


def _torch_ids(pipe: Any, tokenizer: Any, prompt: str) -> np.ndarray:
    text = pipe.maybe_convert_prompt(prompt, tokenizer)
    return np.asarray(tokenizer(text, padding="max_length", max_length=77, truncation=True)["input_ids"])[None]


def _assert_close(ours: Any, theirs: torch.Tensor) -> None:
    reference = theirs.detach().float().numpy()
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=0, atol=1e-4 * max(1.0, np.abs(reference).max()))


def _snapshot(pipe: Any) -> dict[str, Any]:
    return {name: (len(enc.tokenizer), enc.module.config.vocab_size, enc.tokenizer.get_vocab(),
                   np.array(pipe.params[name]["embeddings"]["token_embedding"]["embedding"], copy=True))
            for name, enc in pipe.text_encoders.items()}


def _assert_unchanged(pipe: Any, before: dict[str, Any]) -> None:
    for name, (length, vocab_size, vocab, table) in before.items():
        encoder = pipe.text_encoders[name]
        assert len(encoder.tokenizer) == length and encoder.tokenizer.get_vocab() == vocab
        assert encoder.module.config.vocab_size == vocab_size
        np.testing.assert_array_equal(pipe.params[name]["embeddings"]["token_embedding"]["embedding"], table)


def test_sd1_a1111_and_diffusers_embeddings_match_diffusers(sd1, tmp_path):
    multi = lora_writer.a1111_pt(tmp_path / "style.pt", "<my-style>", _vectors(3, 0))
    single = lora_writer.diffusers_embeds(tmp_path / "learned_embeds.safetensors", "<cat-toy>", _vectors(1, 1)[0])
    a1111_st = lora_writer.a1111_safetensors(tmp_path / "bad-hands.safetensors", _vectors(2, 2))
    before = _snapshot(sd1.pipe)

    ours = apply_embeddings(sd1.pipe, multi)  # token from the file's "name"
    ours = apply_embeddings(ours, single)  # token from the key
    ours = apply_embeddings(ours, a1111_st, token="<bad>")
    theirs = sd1.fresh_torch()
    theirs.load_textual_inversion(str(multi))
    theirs.load_textual_inversion(str(single))
    theirs.load_textual_inversion({"<bad>": torch.from_numpy(_vectors(2, 2))})

    _assert_unchanged(sd1.pipe, before)
    assert ours.text_encoders["text_encoder"].module.config.vocab_size == 49408 + 6
    prompt = PROMPT.format("<my-style> <cat-toy> and <bad>")
    assert expand_prompt(ours, prompt) == PROMPT.format(
        "<my-style> <my-style>_1 <my-style>_2 <cat-toy> and <bad> <bad>_1")
    ids = _sdjax_ids(ours, prompt)
    np.testing.assert_array_equal(ids["text_encoder"], _torch_ids(theirs, theirs.tokenizer, prompt))
    assert set(range(49408, 49414)) <= set(ids["text_encoder"][0].tolist())
    context, _ = _encode(ours, ids)
    with torch.no_grad():
        reference, _ = theirs.encode_prompt(prompt, "cpu", 1, False)
    _assert_close(context, reference)
    # The new rows are what the files hold, in order.
    table = np.asarray(ours.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[49408:49411], _vectors(3, 0))
    np.testing.assert_array_equal(table[49412:49414], _vectors(2, 2))


def test_sdxl_pair_matches_diffusers(sdxl, tmp_path):
    clip_l, clip_g = _vectors(2, 3), _vectors(2, 4)
    path = lora_writer.sdxl_pair(tmp_path / "unaesthetic-xl.safetensors", clip_l, clip_g)
    before = _snapshot(sdxl.pipe)
    ours = apply_embeddings(sdxl.pipe, path)  # token from the file name
    theirs = sdxl.fresh_torch()  # diffusers' documented way: once per encoder
    theirs.load_textual_inversion(torch.from_numpy(clip_g), token="unaesthetic-xl", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    theirs.load_textual_inversion(torch.from_numpy(clip_l), token="unaesthetic-xl", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)

    _assert_unchanged(sdxl.pipe, before)
    prompt = PROMPT.format("unaesthetic-xl")
    ids = _sdjax_ids(ours, prompt)
    for name, tokenizer in (("text_encoder", theirs.tokenizer), ("text_encoder_2", theirs.tokenizer_2)):
        np.testing.assert_array_equal(ids[name], _torch_ids(theirs, tokenizer, prompt))
        assert {49408, 49409} <= set(ids[name][0].tolist())
    context, pooled = _encode(ours, ids)
    with torch.no_grad():
        reference, _, reference_pooled, _ = theirs.encode_prompt(prompt, device="cpu",
                                                                 do_classifier_free_guidance=False)
    _assert_close(context, reference)
    _assert_close(pooled, reference_pooled)


def test_errors(sd1, sdxl, tmp_path):
    with pytest.raises(EmbeddingError, match="width 48, but text_encoder embeds tokens with width 32"):
        apply_embeddings(sd1.pipe, {"<wide>": _vectors(1, 5, width=48)})
    with pytest.raises(EmbeddingError, match=r"\['<\|endoftext\|>'\] already in its vocabulary"):
        apply_embeddings(sd1.pipe, {"<|endoftext|>": _vectors(1, 5)})
    added = apply_embeddings(sd1.pipe, {"<dup>": _vectors(2, 5)})
    with pytest.raises(EmbeddingError, match="already in its vocabulary"):
        apply_embeddings(added, {"<dup>": _vectors(1, 6)})
    with pytest.raises(EmbeddingError, match="unknown textual-inversion format"):
        apply_embeddings(sd1.pipe, {"a": _vectors(1, 5), "b": _vectors(1, 5)})
    with pytest.raises(EmbeddingError, match="SDXL embedding .* not SDXL"):
        apply_embeddings(sd1.pipe, {"clip_l": _vectors(1, 5), "clip_g": _vectors(1, 5)}, token="<xl>")
    with pytest.raises(EmbeddingError, match="SDXL needs an embedding with clip_l and clip_g"):
        apply_embeddings(sdxl.pipe, {"<one>": _vectors(1, 5)})
    with pytest.raises(EmbeddingError, match="pass token="):
        apply_embeddings(sd1.pipe, {"emb_params": _vectors(1, 5)})
    with pytest.raises(EmbeddingError, match="shape"):
        apply_embeddings(sd1.pipe, {"<cube>": np.zeros((1, 2, WIDTH), np.float32)})
    png = tmp_path / "not_an_embedding.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(EmbeddingError, match="PNG"):
        apply_embeddings(sd1.pipe, png)


def test_expand_prompt_finds_tokens_as_the_tokenizer_does(sd1, tmp_path):
    path = lora_writer.a1111_safetensors(tmp_path / "EasyNegative.safetensors", _vectors(3, 7))
    ours = apply_embeddings(sd1.pipe, path)  # token from the file name, capitals kept
    tokenizer = ours.text_encoders["text_encoder"].tokenizer
    assert tokenizer.convert_tokens_to_ids(["EasyNegative", "EasyNegative_1", "EasyNegative_2"]) == [49408, 49409,
                                                                                                       49410]
    # diffusers would leave a token with capitals unexpanded (it compares lower-cased pieces); sdjax does not.
    prompt = "EasyNegative, blurry, easynegative"
    expanded = expand_prompt(ours, prompt)
    assert expanded == ("EasyNegative EasyNegative_1 EasyNegative_2, blurry, "
                        "easynegative EasyNegative_1 EasyNegative_2")
    ids = _sdjax_ids(ours, prompt)["text_encoder"][0].tolist()
    assert ids[:5] == [49406, 49408, 49409, 49410, 267]  # start, the three vectors, ","
    assert ids.count(49408) == ids.count(49409) == ids.count(49410) == 2
    assert expand_prompt(ours, "a plain prompt") == "a plain prompt"
    assert expand_prompt(sd1.pipe, prompt) == prompt  # the original pipeline has no such token
    with pytest.raises(ValueError, match="unknown text encoder 'text_encoder_2'"):
        expand_prompt(ours, prompt, "text_encoder_2")
