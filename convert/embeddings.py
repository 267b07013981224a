"""Textual-inversion embeddings added to a Pipeline as new tokens, as diffusers' ``load_textual_inversion`` does.

Formats:

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ...}`` (the token defaults to ``name``, as in
  diffusers);
- A1111 ``.safetensors``: ``{"emb_params": (n, D)}`` (the token defaults to the file name, as in A1111);
- diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: (n, D) or (D,)}``;
- SDXL pairs: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` for ``text_encoder`` / ``text_encoder_2``.

An embedding of n vectors becomes the tokens ``token``, ``token_1``, ..., ``token_{n-1}``; :func:`expand_prompt`
rewrites ``token`` in a prompt to all of them (diffusers' ``maybe_convert_prompt``). The new Pipeline has a copy
of each tokenizer with the tokens added, a text-encoder module whose config has the new ``vocab_size`` and params
whose ``token_embedding`` has the new rows appended; the original Pipeline is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdjax.convert.safe_load import CheckpointError, is_torch_pickle, load_pickle, read_state_dict

if TYPE_CHECKING:
    from sdjax.pipeline import Pipeline

__all__ = ["AddedTokens", "EmbeddingError", "added_tokens", "apply_embeddings", "embedding_token_groups",
           "expand_prompt", "expand_tokens", "read_embedding"]

EmbeddingSource = str | os.PathLike | Mapping[str, Any]

# SDXL pair keys -> the encoder each one belongs to.
_PAIR = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_SINGLE = "*"  # read_embedding's key for an embedding that is not a pair


class EmbeddingError(ValueError):
    """A textual-inversion embedding that cannot be added to the model."""


# --- reading -----------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EmbeddingError(f"embedding {path}: no such file")
    if not is_torch_pickle(path):
        try:
            return dict(read_state_dict(path))
        except CheckpointError as e:
            raise EmbeddingError(f"embedding {path}: {e}") from None
    # A1111's .pt nests its tensor ({"string_to_param": {"*": ...}}), which read_state_dict's flat view drops;
    # read the nested object through the same weights-only loader (never plain pickle).
    try:
        data = load_pickle(path)
    except CheckpointError as e:
        raise EmbeddingError(f"embedding {e}") from None
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"embedding {path}: holds a {type(data).__name__}, not a dict of tensors")
    return dict(data)


def _vectors(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().float().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" and array.dtype.name != "bfloat16":
        raise EmbeddingError(f"{where} is not a numeric array (dtype {array.dtype})")
    array = array.astype(np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise EmbeddingError(f"{where} has shape {array.shape}; expected (vectors, width)")
    return array


def read_embedding(source: EmbeddingSource) -> tuple[str | None, dict[str, np.ndarray]]:
    """(the token the file names or None, vectors): ``{"*": (n, D)}``, or ``{"clip_l": ..., "clip_g": ...}`` for
    an SDXL pair. Raises :class:`EmbeddingError` for an unknown layout."""
    if isinstance(source, Mapping):
        data, what = dict(source), "embedding (state dict)"
    elif isinstance(source, str | os.PathLike):
        data, what = _read_file(Path(source)), f"embedding {source}"
    else:
        raise TypeError(f"an embedding must be a file path or a mapping, got {type(source).__name__}")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"{what}: string_to_param must hold one tensor, has "
                                 f"{list(params) if isinstance(params, Mapping) else type(params).__name__}")
        name = data.get("name")
        return (name if isinstance(name, str) and name else None), {
            _SINGLE: _vectors(next(iter(params.values())), f"{what}: string_to_param")}
    if "emb_params" in data:  # A1111 .safetensors
        return None, {_SINGLE: _vectors(data["emb_params"], f"{what}: emb_params")}
    if set(_PAIR) <= set(data):  # SDXL
        extra = sorted(set(data) - set(_PAIR))
        if extra:
            raise EmbeddingError(f"{what}: an SDXL embedding holds clip_l and clip_g only, also has {extra}")
        return None, {k: _vectors(data[k], f"{what}: {k}") for k in _PAIR}
    if len(data) == 1:  # diffusers: {token: vectors}
        token, value = next(iter(data.items()))
        return str(token), {_SINGLE: _vectors(value, f"{what}: {token!r}")}
    raise EmbeddingError(
        f"{what}: unknown textual-inversion format (keys: {sorted(map(str, data))[:10]}); expected A1111 "
        "(string_to_param / emb_params), diffusers ({token: vectors}) or SDXL (clip_l + clip_g)")


# --- adding ------------------------------------------------------------------------------------------------------


def _token_names(token: str, count: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def _with_rows(table: Any, rows: np.ndarray, keep: int) -> Any:
    """``table[:keep]`` with ``rows`` appended, as the same kind of array (numpy, or jax on the same devices)."""
    host = np.asarray(table)
    new = np.concatenate([host[:keep], rows.astype(host.dtype)], axis=0)
    if isinstance(table, np.ndarray):
        return new
    import jax

    return jax.device_put(new, getattr(table, "sharding", None))


@dataclasses.dataclass(frozen=True)
class AddedTokens:
    """What an embedding changes, per text encoder: its tokenizer with the new tokens, and its token-embedding
    table with the new rows (``Pipeline.with_added_tokens`` puts both in place)."""

    tokenizers: dict[str, Any]
    embedding_tables: dict[str, Any]


def apply_embeddings(pipe: Pipeline, source: EmbeddingSource, *, token: str | None = None) -> Pipeline:
    """A new Pipeline with a textual-inversion embedding added as new tokens (see the module docstring)."""
    return pipe.with_added_tokens(added_tokens(pipe, source, token=token))


def added_tokens(pipe: Pipeline, source: EmbeddingSource, *, token: str | None = None) -> AddedTokens:
    """The new tokenizers and embedding tables of a textual-inversion embedding for ``pipe`` (left untouched).

    ``token`` names the new token (default: the name the file gives, else the file's stem). Raises
    :class:`EmbeddingError` when the embedding's width does not match the text encoder, the token is already in
    a tokenizer's vocabulary, the format is unknown, or an SDXL pair meets a non-SDXL model (and vice versa).
    """
    name, vectors = read_embedding(source)
    if token is None:
        token = name if name is not None else (Path(source).stem if isinstance(source, str | os.PathLike) else None)
    if not isinstance(token, str) or not token or token != token.strip() or any(c.isspace() for c in token):
        raise EmbeddingError(f"invalid token {token!r}: pass token= with a non-empty word without spaces")

    encoders = list(pipe.text_encoders)
    if _SINGLE in vectors:
        if len(encoders) != 1:
            raise EmbeddingError(
                f"embedding {token!r} has one set of vectors, but this model has {len(encoders)} text encoders "
                f"({', '.join(encoders)}); SDXL needs an embedding with clip_l and clip_g vectors")
        per_encoder = {encoders[0]: vectors[_SINGLE]}
    else:
        if not pipe.is_sdxl:
            raise EmbeddingError(f"embedding {token!r} is an SDXL embedding (clip_l + clip_g), but this model is "
                                 "not SDXL")
        per_encoder = {_PAIR[k]: v for k, v in vectors.items() if _PAIR[k] in pipe.text_encoders}

    tokenizers, tables = {}, {}
    for encoder_name, rows in per_encoder.items():
        encoder = pipe.text_encoders[encoder_name]
        config = encoder.module.config
        if rows.shape[1] != config.hidden_size:
            raise EmbeddingError(
                f"embedding {token!r} has vectors of width {rows.shape[1]}, but {encoder_name} embeds tokens with "
                f"width {config.hidden_size} (an embedding for another model family?)")
        tokenizer = copy.deepcopy(encoder.tokenizer)  # the original Pipeline keeps its tokenizer as it was
        vocab = tokenizer.get_vocab()
        names = _token_names(token, rows.shape[0])
        taken = [t for t in [token, f"{token}_1", *names[1:]] if t in vocab]
        if taken:
            raise EmbeddingError(f"token {token!r} cannot be added to {encoder_name}'s tokenizer: "
                                 f"{sorted(set(taken))} already in its vocabulary; pass another token=")
        first_id = len(tokenizer)
        table = pipe.params[encoder_name]["embeddings"]["token_embedding"]["embedding"]
        if table.shape[0] < first_id:
            raise EmbeddingError(f"{encoder_name} has {table.shape[0]} token embeddings, fewer than its tokenizer's "
                                 f"{first_id} tokens; cannot place new tokens")
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(first_id, first_id + len(names))):
            raise EmbeddingError(f"{encoder_name}'s tokenizer gave the new tokens ids {ids}, expected consecutive ids "
                                 f"from {first_id}")
        # As diffusers' resize_token_embeddings(len(tokenizer) + n): rows past the tokenizer are unreachable.
        tables[encoder_name] = _with_rows(table, rows, first_id)
        tokenizers[encoder_name] = tokenizer
    return AddedTokens(tokenizers=tokenizers, embedding_tables=tables)


# --- prompts -----------------------------------------------------------------------------------------------------


def _multi_vector_tokens(tokenizer: Any) -> dict[int, list[str]]:
    """Token id of each multi-vector token's first vector -> the names of its other vectors."""
    added = tokenizer.added_tokens_encoder
    out: dict[int, list[str]] = {}
    for token, token_id in added.items():
        extra, i = [], 1
        while f"{token}_{i}" in added:
            extra.append(f"{token}_{i}")
            i += 1
        if extra:
            out[token_id] = extra
    return out


def expand_tokens(tokenizer: Any, prompt: str) -> str:
    """Rewrite each multi-vector token ``t`` in ``prompt`` to ``t t_1 ... t_{n-1}`` (diffusers'
    ``maybe_convert_prompt``).

    Occurrences are found by the tokenizer itself (token ids and their character offsets), so a token matches
    wherever the tokenizer would match it. diffusers instead looks the tokenizer's normalised (lower-cased) pieces
    up among the added tokens, so it never expands a token with capitals (``EasyNegative``); for lower-case
    tokens the two agree.
    """
    multi = _multi_vector_tokens(tokenizer)
    if not multi:
        return prompt
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces = zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    for token_id, (_, end) in reversed(list(pieces)):  # right to left: earlier offsets stay valid
        if token_id in multi:
            prompt = f"{prompt[:end]} {' '.join(multi[token_id])}{prompt[end:]}"
    return prompt


def expand_prompt(pipe: Pipeline, prompt: str, encoder: str | None = None) -> str:
    """:func:`expand_tokens` with the tokenizer of ``encoder`` (default: the pipeline's first text encoder; every
    encoder gets the same tokens from :func:`apply_embeddings`, so any of them gives the same result). Call it on
    every prompt (and negative prompt) before tokenizing."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    name = encoder if encoder is not None else next(iter(pipe.text_encoders))
    if name not in pipe.text_encoders:
        raise ValueError(f"unknown text encoder {name!r}; this model has {', '.join(pipe.text_encoders)}")
    return expand_tokens(pipe.text_encoders[name].tokenizer, prompt)


def embedding_token_groups(tokenizer: Any) -> dict[int, list[int]]:
    """Token id of each multi-vector embedding's first vector -> the ids of all its vectors, in order. Prompt
    chunking (:mod:`sdjax.tokenizer`) expands and keeps each group together with this."""
    return {first: [first, *tokenizer.convert_tokens_to_ids(rest)]
            for first, rest in _multi_vector_tokens(tokenizer).items()}
