"""Typed configs (models, schedulers) parsed from diffusers/transformers ``config.json`` files.

Every key of the file is accounted for: a dataclass field, a key whose value must be one sdjax supports, or a
metadata key with no effect on the computation. Anything else is an error that names the key, so a config
sdjax cannot honour is never silently half-applied.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Keys that describe the file, not the model.
METADATA_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values",
    "architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "initializer_range", "initializer_factor",
    "id2label", "label2id", "problem_type", "tie_word_embeddings", "is_encoder_decoder", "chunk_size_feed_forward",
    "use_cache", "attention_dropout", "dropout", "tokenizer_class", "prefix", "pruned_heads", "torchscript",
    "_attn_implementation_autoset", "_attn_implementation", "add_cross_attention", "cross_attention_hidden_size",
    "task_specific_params", "finetuning_task", "tf_legacy_loss", "use_bfloat16", "bad_words_ids",
    "begin_suppress_tokens", "decoder_start_token_id", "sep_token_id", "is_decoder", "output_scores",
    "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id_deprecated",
})


class ConfigError(ValueError):
    """A config key or value that sdjax does not support."""


def parse_config(
    cls: type[T],
    raw: Mapping[str, Any],
    *,
    required_values: Mapping[str, tuple[Any, ...]] | None = None,
    ignored: frozenset[str] | set[str] = frozenset(),
    what: str | None = None,
) -> T:
    """Build dataclass ``cls`` from ``raw``.

    ``required_values``: key -> the values sdjax supports for a key it does not otherwise use (e.g.
    ``"class_embed_type": (None,)``); any other value is an error. ``ignored``: further keys with no effect.
    Lists become tuples so configs stay hashable (they are static arguments under jit).
    """
    name = what or cls.__name__
    required_values = required_values or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if key in fields:
            kwargs[key] = _freeze(value)
        elif key in required_values:
            if _freeze(value) not in required_values[key]:
                allowed = ", ".join(repr(v) for v in required_values[key])
                problems.append(f"{key}={value!r} (sdjax supports {allowed})")
        elif key in METADATA_KEYS or key in ignored:
            continue
        else:
            problems.append(f"{key}={value!r} (unknown key)")
    if problems:
        raise ConfigError(f"unsupported {name} config: " + "; ".join(problems))
    return cls(**kwargs)


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
