"""Prompts longer than 77 tokens and emphasis, as AUTOMATIC1111 encodes them, on the tiny models.

- Chunking rules (sdjax.tokenizer.prompt_chunks): 75 tokens a chunk, BREAK, comma backtrack, embeddings kept whole.
- Encoding: every chunk encoded by transformers' CLIPTextModel on its own and concatenated equals sdjax's context.
- Emphasis: a reference written here from A1111's sd_hijack_clip.py / sd_emphasis.py formulas.
- encode_prompt against diffusers' pipe.encode_prompt.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import text
from sdjax.convert.embeddings import embedding_token_groups
from sdjax.tokenizer import load_tokenizer, prompt_chunks, tokenize

pytestmark = pytest.mark.usefixtures("fast_compile")

CLIP = load_tokenizer(None, convention="clip")
OPENCLIP = load_tokenizer(None, convention="openclip")
CAT, DOG, COMMA = (CLIP.convert_tokens_to_ids(t) for t in ("cat</w>", "dog</w>", ",</w>"))
BOS, EOS = CLIP.bos_token_id, CLIP.eos_token_id
LONG = ("a photo of a cat, " * 12 + "sitting on a red chair, (highly detailed:1.3), [blurry] " * 3
        + "BREAK a dog in the park, " * 2)


def chunk(tokens: list[int], pad: int = EOS) -> list[int]:
    return [BOS, *tokens, EOS] + [pad] * (75 - len(tokens))


def test_short_prompts_tokenize_as_diffusers():
    prompts = ["a photo of a cat", "", "wow!! a dog, on a beach", "x " * 75]
    for tokenizer in (CLIP, OPENCLIP):
        expected, _ = tokenize(tokenizer, prompts)
        for prompt, ids in zip(prompts, expected, strict=True):
            chunks, weights = prompt_chunks(tokenizer, prompt)
            np.testing.assert_array_equal(chunks, ids[None])
            np.testing.assert_array_equal(weights, np.ones((1, 77)))


def test_long_prompts_are_chunked_by_75():
    ids, weights = prompt_chunks(CLIP, "cat " * 150)
    assert ids.tolist() == [chunk([CAT] * 75)] * 2 and weights.shape == (2, 77)
    ids, _ = prompt_chunks(CLIP, "cat " * 76)
    assert ids.tolist() == [chunk([CAT] * 75), chunk([CAT])]
    ids, _ = prompt_chunks(OPENCLIP, "cat " * 76)  # OpenCLIP pads with "!" (id 0) after the end token
    assert ids.tolist() == [chunk([CAT] * 75, pad=0), chunk([CAT], pad=0)]


def test_comma_backtrack():
    # The chunk fills up 5 tokens after its last comma: what follows the comma moves to the next chunk.
    ids, _ = prompt_chunks(CLIP, "cat " * 70 + ", " + "dog " * 10)
    assert ids.tolist() == [chunk([CAT] * 70 + [COMMA]), chunk([DOG] * 10)]
    # More than 20 tokens back: no backtrack.
    ids, _ = prompt_chunks(CLIP, "cat " * 50 + ", " + "dog " * 30)
    assert ids.tolist() == [chunk([CAT] * 50 + [COMMA] + [DOG] * 24), chunk([DOG] * 6)]
    ids, _ = prompt_chunks(CLIP, "cat " * 50 + ", " + "dog " * 30, comma_backtrack=0)
    assert ids.tolist() == [chunk([CAT] * 50 + [COMMA] + [DOG] * 24), chunk([DOG] * 6)]
    ids, _ = prompt_chunks(CLIP, "cat " * 70 + ", " + "dog " * 10, comma_backtrack=0)
    assert ids.tolist() == [chunk([CAT] * 70 + [COMMA] + [DOG] * 4), chunk([DOG] * 6)]


def test_break_and_weights():
    ids, weights = prompt_chunks(CLIP, "cat BREAK (dog:1.5) [cat]")
    assert ids.tolist() == [chunk([CAT]), chunk([DOG, CAT])]
    np.testing.assert_allclose(weights[1, :4], [1.0, 1.5, 1 / 1.1, 1.0])
    assert prompt_chunks(CLIP, "BREAK cat")[0].tolist() == [chunk([]), chunk([CAT])]
    literal, w = prompt_chunks(CLIP, "(dog:1.5) BREAK", emphasis=False)  # emphasis "none": brackets are text
    assert literal.shape == (1, 77) and np.all(w == 1) and literal[0, 1] != DOG


def test_textual_inversion_embedding_is_never_split():
    tokenizer = copy.deepcopy(CLIP)
    tokenizer.add_tokens(["<emb>", "<emb>_1", "<emb>_2"])
    groups = embedding_token_groups(tokenizer)
    emb = groups[tokenizer.convert_tokens_to_ids("<emb>")]
    assert len(emb) == 3
    ids, weights = prompt_chunks(tokenizer, "cat " * 73 + "(<emb>:1.2)", groups=groups)
    assert ids.tolist() == [chunk([CAT] * 73), chunk(emb)]
    np.testing.assert_allclose(weights[1, 1:4], 1.2)
    ids, _ = prompt_chunks(tokenizer, "cat " * 72 + "<emb>", groups=groups)
    assert ids.tolist() == [chunk([CAT] * 72 + emb)]


# --- encoding against transformers ---------------------------------------------------------------------------------


def torch_chunk_states(torch_pipe, tokens: dict, clip_skip: int | None, sdxl: bool):
    """Per encoder: hidden states (B, n, 77, D) of every chunk encoded separately by transformers, and SDXL's pooled
    projection of the first chunk."""
    encoders = {"text_encoder": getattr(torch_pipe, "text_encoder", None),
                "text_encoder_2": getattr(torch_pipe, "text_encoder_2", None)}
    states, pooled = {}, None
    for name, t in tokens.items():
        encoder = encoders[name]
        ids = np.asarray(t.ids)
        batch, n = ids.shape[0], ids.shape[1] // 77
        with torch.no_grad():
            out = encoder(torch.from_numpy(ids.reshape(batch * n, 77).astype(np.int64)), output_hidden_states=True)
            if sdxl:
                z = out.hidden_states[-((clip_skip or 0) + 2)]
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds.reshape(batch, n, -1)[:, 0].numpy()
            elif clip_skip:
                z = encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
            else:
                z = out.last_hidden_state
        states[name] = z.numpy().reshape(batch, n, 77, -1)
    return states, pooled


def a1111_emphasis(z: np.ndarray, multipliers: np.ndarray, mode: str) -> np.ndarray:
    """sd_emphasis.EmphasisOriginal / EmphasisOriginalNoNorm on one chunk of one prompt: z (77, D), multipliers
    (77,). Original: z * m, then z * (original mean / new mean)."""
    original_mean = z.astype(np.float64).mean()
    weighted = z * multipliers[:, None]
    if mode == "no_norm":
        return weighted
    return weighted * (original_mean / weighted.astype(np.float64).mean())


def reference_context(torch_pipe, tokens, clip_skip, sdxl, emphasis):
    states, pooled = torch_chunk_states(torch_pipe, tokens, clip_skip, sdxl)
    contexts = []
    for name, z in states.items():
        w = np.asarray(tokens[name].weights).reshape(z.shape[:3])
        if emphasis != "none":
            z = np.stack([np.stack([a1111_emphasis(z[b, c], w[b, c], emphasis) for c in range(z.shape[1])])
                          for b in range(z.shape[0])])
        contexts.append(z.reshape(z.shape[0], -1, z.shape[-1]))
    return np.concatenate(contexts, axis=-1), pooled


def sdjax_context(pipe, tokens, clip_skip, emphasis):
    encoders = tuple((name, enc.module) for name, enc in pipe.text_encoders.items())
    return text.encode_modules(pipe.is_sdxl, encoders, pipe.params, tokens, clip_skip, emphasis=emphasis)


def assert_close(actual, expected, tol=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=tol * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_long_prompt_context_matches_chunkwise_transformers(tiny, kind):
    model = tiny(kind)
    pipe, sdxl = model.pipe, kind == "sdxl"
    prompts = [LONG, "a cat"]
    cond, uncond = text.equal_chunks(pipe, text.prompt_tokens(pipe, prompts), text.prompt_tokens(pipe, ["", ""]))
    assert {t.chunks for t in cond.values()} == {t.chunks for t in uncond.values()} == {4}
    for clip_skip in (None, 1):
        for emphasis in ("original", "no_norm"):
            ctx, pooled = sdjax_context(pipe, cond, clip_skip, emphasis)
            expected, expected_pooled = reference_context(model.torch_pipe, cond, clip_skip, sdxl, emphasis)
            assert ctx.shape == expected.shape == (2, 4 * 77, expected.shape[-1])
            assert_close(ctx, expected)
            if sdxl:
                assert_close(pooled, expected_pooled)
    # The negative padded with empty chunks: each is the encoding of an empty prompt.
    uctx, _ = sdjax_context(pipe, uncond, None, "original")
    empty, _ = sdjax_context(pipe, text.prompt_tokens(pipe, [""]), None, "original")
    assert_close(uctx[:, 77:154], np.broadcast_to(empty, (2, 77, empty.shape[-1])))


def test_emphasis_changes_the_context_as_a1111(tiny):
    model = tiny("sd1")
    pipe = model.pipe
    tokens = text.prompt_tokens(pipe, ["a (red:1.4) cat on a [[chair]]", "((a dog)), (sky:0.5)"])
    weights = np.asarray(tokens["text_encoder"].weights)
    assert weights.max() == pytest.approx(1.4) and weights.min() == pytest.approx(0.5)
    plain = text.prompt_tokens(pipe, ["a (red:1.4) cat on a [[chair]]", "((a dog)), (sky:0.5)"], emphasis="none")
    assert np.all(np.asarray(plain["text_encoder"].weights) == 1)
    for emphasis in ("original", "no_norm"):
        ctx, _ = sdjax_context(pipe, tokens, None, emphasis)
        expected, _ = reference_context(model.torch_pipe, tokens, None, False, emphasis)
        assert_close(ctx, expected)
        unweighted, _ = reference_context(model.torch_pipe, tokens, None, False, "none")
        assert np.abs(np.asarray(ctx) - unweighted).max() > 1e-2  # the weights did something


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_short_prompts_encode_bit_identically(tiny, kind):
    pipe = tiny(kind).pipe
    prompts = ["a photo of a cat", "a dog, on a beach"]
    tokens = text.prompt_tokens(pipe, prompts)
    bare = {name: tokenize(enc.tokenizer, prompts)[0] for name, enc in pipe.text_encoders.items()}
    for name in bare:
        np.testing.assert_array_equal(tokens[name].ids, bare[name])
    for clip_skip in (None, 1):
        ctx, pooled = sdjax_context(pipe, tokens, clip_skip, "original")
        bare_ctx, bare_pooled = sdjax_context(pipe, {k: jnp.asarray(v) for k, v in bare.items()}, clip_skip,
                                              "original")
        np.testing.assert_array_equal(np.asarray(ctx), np.asarray(bare_ctx))
        if pooled is not None:
            np.testing.assert_array_equal(np.asarray(pooled), np.asarray(bare_pooled))


# --- encode_prompt -------------------------------------------------------------------------------------------------


def test_encode_prompt_matches_diffusers_sd1(tiny):
    model = tiny("sd1")
    prompts, negatives = ["a photo of a cat", "a red chair in a room"], ["blurry", "ugly, dark"]
    embeds = model.pipe.encode_prompt(prompts, negative_prompt=negatives)
    with torch.no_grad():
        expected, expected_neg = model.torch_pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
    assert embeds.prompt_embeds.shape == tuple(expected.shape) == (2, 77, 32)
    assert_close(embeds.prompt_embeds, expected.numpy(), 1e-4)
    assert_close(embeds.negative_prompt_embeds, expected_neg.numpy(), 1e-4)
    assert embeds.pooled_prompt_embeds is None and embeds.negative_pooled_prompt_embeds is None
    # No negative: the empty prompt, as diffusers. num_images_per_prompt repeats each prompt.
    embeds = model.pipe.encode_prompt(prompts, num_images_per_prompt=2)
    with torch.no_grad():
        expected, expected_neg = model.torch_pipe.encode_prompt(prompts, "cpu", 2, True)
    assert_close(embeds.prompt_embeds, expected.numpy(), 1e-4)
    assert_close(embeds.negative_prompt_embeds, expected_neg.numpy(), 1e-4)
    # CLIP skip: diffusers' own path needs transformers < 5.6; the hidden state by hand, for both halves.
    embeds = model.pipe.encode_prompt(prompts, negative_prompt=negatives, clip_skip=1)
    for ours, texts in ((embeds.prompt_embeds, prompts), (embeds.negative_prompt_embeds, negatives)):
        ids = model.torch_pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.torch_pipe.text_encoder(ids, output_hidden_states=True)
            assert_close(ours, model.torch_pipe.text_encoder.final_layer_norm(out.hidden_states[-2]).numpy(), 1e-4)


def test_encode_prompt_matches_diffusers_sdxl(tiny):
    model = tiny("sdxl")
    prompts, negatives = ["a photo of a cat", "a red chair"], ["blurry", "dark"]
    for clip_skip in (None, 1):
        embeds = model.pipe.encode_prompt(prompts, negative_prompt=negatives, prompt_2=["a cat", "chair, red"],
                                          clip_skip=clip_skip)
        with torch.no_grad():
            expected = model.torch_pipe.encode_prompt(prompts, prompt_2=["a cat", "chair, red"], device="cpu",
                                                      negative_prompt=negatives, clip_skip=clip_skip)
            # sdjax gives the negative the prompt's CLIP skip: compare with diffusers encoding it as a prompt.
            expected_neg = model.torch_pipe.encode_prompt(negatives, device="cpu", clip_skip=clip_skip)
        assert_close(embeds.prompt_embeds, expected[0].numpy(), 1e-4)
        assert_close(embeds.pooled_prompt_embeds, expected[2].numpy(), 1e-4)
        assert_close(embeds.negative_prompt_embeds, expected_neg[0].numpy(), 1e-4)
        assert_close(embeds.negative_pooled_prompt_embeds, expected_neg[2].numpy(), 1e-4)
        if clip_skip is None:
            assert_close(embeds.negative_prompt_embeds, expected[1].numpy(), 1e-4)
    # A long prompt_2 gives both encoders (and the negative) its chunk count.
    embeds = model.pipe.encode_prompt("a cat", negative_prompt="blurry", prompt_2="a dog, " * 40)
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (1, 154, 64)
    # force_zeros_for_empty_prompt: no negative -> zeros, as diffusers.
    embeds = model.pipe.encode_prompt("a cat")
    assert model.pipe.force_zeros_for_empty_prompt
    assert not embeds.negative_prompt_embeds.any() and not embeds.negative_pooled_prompt_embeds.any()
    assert embeds.negative_prompt_embeds.shape == embeds.prompt_embeds.shape == (1, 77, 64)


def test_encode_prompt_long_prompt_and_errors(tiny):
    pipe = tiny("sd1").pipe
    embeds = pipe.encode_prompt(["cat " * 100, "a dog"], negative_prompt="blurry")
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (2, 154, 32)
    with pytest.raises(ValueError, match="clip_skip=5"):
        pipe.encode_prompt("x", clip_skip=5)
    with pytest.raises(ValueError, match="emphasis"):
        pipe.encode_prompt("x", emphasis="loud")
    with pytest.raises(ValueError, match="negative_prompt has 3 entries"):
        pipe.encode_prompt(["a", "b"], negative_prompt=["x", "y", "z"])
    with pytest.raises(TypeError, match="SDXL-only"):
        pipe.encode_prompt("x", prompt_2="y")
