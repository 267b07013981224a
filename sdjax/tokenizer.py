"""CLIP tokenizers that work offline.

sdjax ships the CLIP BPE vocabulary (``sdjax/assets/tokenizers/bpe``, derived from OpenAI's merges list by
``make_tokenizer_files.py`` there) and two special-token conventions:

- ``"clip"``: OpenAI CLIP ViT-L/14 as used by SD 1.x and SDXL's first encoder; pads with ``<|endoftext|>``.
- ``"openclip"``: OpenCLIP ViT-H / bigG as used by SD 2.x and SDXL's second encoder; pads with ``!`` (id 0).

The padding token matters: the UNet sees the text encoder's states at padded positions too.

:func:`prompt_chunks` tokenizes a prompt as AUTOMATIC1111 does: emphasis weights per token, any length in chunks of
75 tokens (each wrapped in start/end tokens and padded to 77), ``BREAK`` to start a new chunk, a chunk ended after
its last comma when that is at most 20 tokens back, and a textual-inversion embedding never split across chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from transformers import CLIPTokenizer

Convention = Literal["clip", "openclip"]
CONVENTIONS: tuple[str, ...] = ("clip", "openclip")
MAX_LENGTH = 77
CHUNK_TOKENS = MAX_LENGTH - 2  # the prompt tokens of one chunk, between its start and end tokens
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# The shipped files: bpe/ (vocab.json, merges.txt) and one tokenizer_config.json folder per convention.
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "tokenizers"


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds its own tokenizer: ``vocab.json`` + ``merges.txt`` or a ``tokenizer.json``."""
    folder = Path(folder)
    bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return bpe or (folder / "tokenizer.json").is_file()


def load_tokenizer(folder: str | Path | None = None, *, convention: Convention) -> CLIPTokenizer:
    """A model folder's own tokenizer when it has one, else sdjax's shipped files for ``convention``.

    ``folder`` is a tokenizer folder (e.g. a diffusers model's ``tokenizer/`` or ``tokenizer_2/``); its files
    take precedence. Without them, ``convention`` picks the padding convention of the shipped vocabulary.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown tokenizer convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        if has_tokenizer_files(folder):
            return CLIPTokenizer.from_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(
        str(SHIPPED_DIR / convention),
        vocab_file=str(SHIPPED_DIR / "bpe" / "vocab.json"),
        merges_file=str(SHIPPED_DIR / "bpe" / "merges.txt"),
    )


def tokenize(
    tokenizer: CLIPTokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH
) -> tuple[np.ndarray, list[int]]:
    """Token ids ``(B, max_length)`` int32, padded and truncated, and how many tokens each prompt lost.

    Truncation keeps ``<|startoftext|>`` and ends the sequence with ``<|endoftext|>``, as diffusers does.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}")
    prompts = list(prompts)
    if not prompts:
        return np.zeros((0, max_length), np.int32), []
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    # Untruncated lengths only count what was cut; verbose=False silences the too-long warning.
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    n_truncated = [max(0, len(f) - max_length) for f in full]
    return np.asarray(ids, dtype=np.int32), n_truncated


def prompt_chunks(
    tokenizer: CLIPTokenizer,
    prompt: str,
    *,
    emphasis: bool = True,
    groups: Mapping[int, Sequence[int]] | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n, 77) int32, weights (n, 77) float32)``: one prompt in A1111's chunks (see the module docstring).

    ``emphasis``: read ``(x:1.2)`` / ``[x]`` / ``BREAK`` (A1111's emphasis modes other than "None"); False takes the
    text literally, every weight 1. ``groups``: first token id -> all ids of a multi-vector textual-inversion
    embedding (``sdjax.convert.embeddings.embedding_token_groups``); each is expanded and kept in one chunk. After a
    chunk's end token the rest is the tokenizer's padding token, as A1111 pads each tokenizer (SD 1.x with
    ``<|endoftext|>``, OpenCLIP with ``!``).
    """
    from sdjax.prompts import is_break, parse_prompt_attention

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    groups = groups or {}
    parsed = parse_prompt_attention(prompt) if emphasis else [[prompt, 1.0]]
    texts = [text for text, _ in parsed]
    pieces = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        fill = CHUNK_TOKENS - len(ids)
        chunks.append(([bos, *ids, eos, *[pad] * fill], [1.0, *weights, 1.0, *[1.0] * fill]))
        ids, weights, last_comma = [], [], -1

    for tokens, item in zip(pieces, parsed, strict=True):
        if is_break(item):
            close_chunk()
            continue
        weight = float(item[1])
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == CHUNK_TOKENS and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                # The chunk is full: move what follows its last comma into the next chunk.
                moved_ids, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            group = groups.get(token, (token,))
            if len(group) > 1 and len(ids) + len(group) > CHUNK_TOKENS:
                close_chunk()  # an embedding's vectors stay in one chunk
            ids.extend(group)
            weights.extend([weight] * len(group))
    if ids or not chunks:
        close_chunk()
    return np.asarray([c[0] for c in chunks], np.int32), np.asarray([c[1] for c in chunks], np.float32)


def empty_chunk(tokenizer: CLIPTokenizer) -> np.ndarray:
    """The ids (77,) of a chunk with no prompt tokens: what shorter prompts are padded with (A1111's empty chunk)."""
    return np.asarray([tokenizer.bos_token_id, tokenizer.eos_token_id]
                      + [tokenizer.pad_token_id] * CHUNK_TOKENS, np.int32)
