"""Shipped offline tokenizers against OpenAI/OpenCLIP's own tokenizer, padding conventions, folder precedence.

The reference is ``SimpleTokenizer`` from the open-clip-torch package (test extra; installed with
``--no-deps``: only its ``tokenizer.py``, which needs ftfy and regex, is loaded, straight from its file).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdjax.tokenizer import SHIPPED_DIR, load_tokenizer, tokenize

BOS, EOS = 49406, 49407

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, MiXeD CaSe",
    "punctuation: commas, dots... (parens) [brackets] {braces} #tag @user 3.14 -- 50% off? yes; 'quoted' a/b",
    "Café crème, naïve résumé at the Ångström fjord; São Paulo; ß",
    "emoji 🐱🚀✨😀 and flags 🇯🇵",
    "日本語のテキスト 中文 한국어 русский текст ελληνικά",
    "don't we'll they're I'd you've she's I'm",
    "   leading, trailing\tand\nmultiple   spaces   ",
    "",
    "a very long prompt, " * 30,
    "masterpiece, best quality, " + "highly detailed " * 60,
]
# Where the conventions differ from OpenCLIP itself: the "openclip" pad token "!" is a special token in the
# transformers tokenizer, so "!" becomes id 0 as with the hub's SD 2.x / SDXL tokenizer_2 (diffusers #4153).
BANG_PROMPTS = ["wow! so cool!!! ! !!", "hello, world!"]


@functools.cache
def open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the reference needs open-clip-torch and ftfy: pip install ftfy 'open-clip-torch' --no-deps")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_ids(prompts: list[str], pad: int) -> tuple[np.ndarray, list[int]]:
    """OpenCLIP's ids (it pads with 0) with its padding replaced by ``pad``, and tokens cut per prompt."""
    tok = open_clip_tokenizer()
    ids = tok(prompts).numpy().astype(np.int32)
    for row in ids:
        end = int(np.argmax(row == EOS))
        row[end + 1:] = pad
    cut = [max(0, len(tok.encode(p)) + 2 - 77) for p in prompts]
    return ids, cut


@functools.cache
def shipped(convention: str):
    return load_tokenizer(None, convention=convention)


def test_shipped_vocabulary_is_clips() -> None:
    """vocab.json/merges.txt hold exactly CLIP's BPE: same token ids and merge ranks as OpenAI's tokenizer."""
    tok = open_clip_tokenizer()
    vocab = json.loads((SHIPPED_DIR / "bpe" / "vocab.json").read_text(encoding="utf-8"))
    expected = {k: v for k, v in tok.encoder.items() if k not in ("<start_of_text>", "<end_of_text>")}
    expected.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    assert vocab == expected and len(vocab) == 49408
    lines = (SHIPPED_DIR / "bpe" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split()) for line in lines[1:]] == sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)


@pytest.mark.parametrize(("convention", "pad"), [("clip", EOS), ("openclip", 0)])
def test_ids_match_open_clip(convention: str, pad: int) -> None:
    tokenizer = shipped(convention)
    assert tokenizer.pad_token_id == pad
    ids, cut = tokenize(tokenizer, PROMPTS)
    expected, expected_cut = reference_ids(PROMPTS, pad)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    for prompt, row, ref_row in zip(PROMPTS, ids, expected, strict=True):
        np.testing.assert_array_equal(row, ref_row, err_msg=repr(prompt))
    assert cut == expected_cut
    assert cut[-2] > 0 and cut[-1] > 0 and sum(cut[:-2]) == 0
    assert np.all(ids[-2:, -1] == EOS)  # truncation keeps the end token


def test_known_ids_and_padding() -> None:
    ids, cut = tokenize(shipped("clip"), ["a photo of a cat", ""])
    np.testing.assert_array_equal(ids[0, :8], [BOS, 320, 1125, 539, 320, 2368, EOS, EOS])
    np.testing.assert_array_equal(ids[1], [BOS] + [EOS] * 76)
    ids, _ = tokenize(shipped("openclip"), ["a photo of a cat", ""])
    np.testing.assert_array_equal(ids[0, :8], [BOS, 320, 1125, 539, 320, 2368, EOS, 0])
    np.testing.assert_array_equal(ids[1], [BOS, EOS] + [0] * 75)
    assert cut == [0, 0]


def test_exclamation_marks() -> None:
    """"!" is id 0 under "openclip" (its pad token), as diffusers' SD 2.x/SDXL tokenizers give; "clip" is OpenAI's."""
    clip_ids, _ = tokenize(shipped("clip"), BANG_PROMPTS)
    np.testing.assert_array_equal(clip_ids, reference_ids(BANG_PROMPTS, EOS)[0])
    ids, _ = tokenize(shipped("openclip"), ["wow!!"])
    np.testing.assert_array_equal(ids[0, :5], [BOS, 2781, 0, 0, EOS])


def test_truncation_boundary() -> None:
    tokenizer = shipped("clip")
    prompts = ["a " * 75, "a " * 76, "a " * 80]
    ids, cut = tokenize(tokenizer, prompts)
    assert cut == [0, 1, 5]
    assert np.all(ids[:, 0] == BOS) and np.all(ids[:, -1] == EOS) and np.all(ids[:, 1:-1] == 320)
    short, short_cut = tokenize(tokenizer, ["a b c d"], max_length=4)
    np.testing.assert_array_equal(short[0], [BOS, 320, 321, EOS])
    assert short_cut == [2]


def _write_folder(folder: Path, pad_token: str) -> Path:
    folder.mkdir()
    shutil.copy(SHIPPED_DIR / "bpe" / "vocab.json", folder)
    shutil.copy(SHIPPED_DIR / "bpe" / "merges.txt", folder)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_folder_files_take_precedence(tmp_path: Path) -> None:
    # The folder says "pad with <|endoftext|>"; the convention asked for would pad with "!".
    own = load_tokenizer(_write_folder(tmp_path / "own", "<|endoftext|>"), convention="openclip")
    assert own.pad_token_id == EOS
    # A vocabulary of the folder's own: drop a merge so "cat" splits differently.
    edited = _write_folder(tmp_path / "edited", "!")
    merges = (edited / "merges.txt").read_text(encoding="utf-8").splitlines()
    cat_merge = next(line for line in merges[1:] if "".join(line.split()) == "cat</w>")
    (edited / "merges.txt").write_text("\n".join(m for m in merges if m != cat_merge) + "\n", encoding="utf-8")
    ids, _ = tokenize(load_tokenizer(edited, convention="clip"), ["cat"])
    assert ids[0, 1] != 2368 and ids[0, 3] != 0

    # transformers 5 saves tokenizer.json without vocab.json/merges.txt: still the folder's own.
    saved = tmp_path / "saved"
    own.save_pretrained(saved)
    assert not (saved / "vocab.json").exists()
    assert load_tokenizer(saved, convention="openclip").pad_token_id == EOS

    # A folder without tokenizer files falls back to the shipped convention.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_tokenizer(empty, convention="openclip").pad_token_id == 0


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer convention 'sd3'"):
        load_tokenizer(None, convention="sd3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing", convention="clip")
    with pytest.raises(TypeError, match="list of strings"):
        tokenize(shipped("clip"), "a single string")
    with pytest.raises(TypeError, match="list of strings"):
        tokenize(shipped("clip"), ["ok", None])
    ids, cut = tokenize(shipped("clip"), [])
    assert ids.shape == (0, 77) and cut == []
