"""AUTOMATIC1111's ``parameters`` text: the settings of an image, as image browsers and A1111 read them.

    a red circle                                   the prompt (may span lines)
    Negative prompt: blurry                        optional, may span lines
    Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 12, Size: 512x512, ...

Values holding ``,``, ``:`` or a newline are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# A1111's own pattern (modules/infotext_utils.py): a key, then a quoted or plain value up to the next comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return str(json.loads(text))
    except ValueError:
        return text


def format_parameters(prompt: str, negative_prompt: str | None, fields: Mapping[str, Any],
                      extra: Mapping[str, Any] | None = None) -> str:
    """The text for one image: ``fields`` in order, then ``extra`` (e.g. guidance settings); None values are
    left out."""
    items = [*fields.items(), *(extra or {}).items()]
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in items if value is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """A ``parameters`` text -> ``{"Prompt": ..., "Negative prompt": ..., "Steps": "30", ...}`` (values as
    written, unquoted), as A1111's ``parse_generation_parameters`` reads it."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:  # not a settings line: part of the prompt
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        result[key.strip()] = unquote(value.strip())
    return result
