"""CLIP tokenizers that work offline.

sdjax ships the CLIP BPE vocabulary (``sdjax/assets/tokenizers/bpe``, derived from OpenAI's merges list by
``make_tokenizer_files.py`` there) and two special-token conventions:

- ``"clip"``: OpenAI CLIP ViT-L/14 as used by SD 1.x and SDXL's first encoder; pads with ``<|endoftext|>``.
- ``"openclip"``: OpenCLIP ViT-H / bigG as used by SD 2.x and SDXL's second encoder; pads with ``!`` (id 0).

The padding token matters: the UNet sees the text encoder's states at padded positions too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from transformers import CLIPTokenizer

Convention = Literal["clip", "openclip"]
CONVENTIONS: tuple[str, ...] = ("clip", "openclip")
MAX_LENGTH = 77

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
