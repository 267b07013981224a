"""Host side of prompt editing, alternation and ``AND``: which texts each pass encodes, and which one each step uses.

A1111 resolves ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and ``[a|b]`` into one prompt text per sampler
call (:func:`sdjax.prompts.step_prompts`) and splits the prompt (not the negative) at ``AND`` into weighted parts,
each scheduled on its own. Here every pass (the prompt's parts ``"cond"``, ``"cond_1"``, ...; the negative
``"uncond"``) gets, per image, its distinct texts in order of first use (M of them: a compile-time shape, the most
any image of the batch has; an image with fewer repeats its last) and a (B, num_steps) int32 table of which one
each step uses (traced: moving ``when`` changes numbers only). A pass whose texts never change keeps the plain
layout (B, tokens) and gets no table, so a request without editing compiles and runs exactly as before.

Steps are counted as A1111's ``CFGDenoiser.step``: from 0 at the first step the sampler runs (image-to-image
starts at 0 too), against a schedule of ``num_steps`` steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sdjax.guidance import COND, cond_parts
from sdjax.prompts import split_and, step_prompts


@dataclasses.dataclass(frozen=True)
class PassTexts:
    """One pass: ``texts`` (and SDXL's ``texts_2``) flat, ``count`` per image (B * count), and the per-step
    table (B, num_steps) into them, or None (count 1, the same text at every step)."""

    texts: list[str]
    texts_2: list[str] | None
    count: int
    steps: np.ndarray | None


def and_parts(prompts: Sequence[str]) -> tuple[list[list[str]], np.ndarray | None]:
    """Per prompt its ``AND`` parts' texts (padded with "" to the batch's largest count K), and the (B, K) float32
    weights (0 for padding); weights None when no prompt has AND or a weight (plain guidance, as before)."""
    split = [split_and(p) for p in prompts]
    if all(len(parts) == 1 and parts[0][1] == 1.0 for parts in split):
        return [[p] for p in prompts], None
    k = max(len(parts) for parts in split)
    texts = [[t for t, _ in parts] + [""] * (k - len(parts)) for parts in split]
    weights = np.zeros((len(prompts), k), np.float32)
    for b, parts in enumerate(split):
        weights[b, :len(parts)] = [w for _, w in parts]
    return texts, weights


def _step_texts(prompt: str, num_steps: int, hires: tuple[int, int] | None) -> list[str]:
    if hires is None:
        return step_prompts(prompt, num_steps)
    # a hires fix's second pass, as A1111's calculate_hr_conds: its steps count on from the first pass's; the
    # pass runs hires[1] steps of a longer schedule, so the table's later entries are never read
    texts = step_prompts(prompt, *hires)
    return texts + [texts[-1]] * (num_steps - len(texts))


def schedule_pass(prompts: Sequence[str], prompts_2: Sequence[str] | None, num_steps: int,
                  hires: tuple[int, int] | None = None) -> PassTexts:
    """The distinct (text, text_2) pairs of each prompt over the steps, and the table of which each step uses;
    ``hires``: (first pass steps, hires steps) for a hires fix's second pass."""
    per_image, tables = [], []
    for b, prompt in enumerate(prompts):
        first = _step_texts(prompt, num_steps, hires)
        second = _step_texts(prompts_2[b], num_steps, hires) if prompts_2 else [None] * num_steps
        distinct: dict[tuple[str, str | None], int] = {}
        table = [distinct.setdefault(pair, len(distinct)) for pair in zip(first, second, strict=True)]
        per_image.append(list(distinct))
        tables.append(table)
    count = max(len(d) for d in per_image)
    flat = [d[min(m, len(d) - 1)] for d in per_image for m in range(count)]
    texts = [t for t, _ in flat]
    texts_2 = [t2 for _, t2 in flat] if prompts_2 else None
    steps = np.asarray(tables, np.int32) if count > 1 else None
    return PassTexts(texts, texts_2, count, steps)


def prompt_passes(prompts: Sequence[str], prompts_2: Sequence[str] | None, num_steps: int,
                  hires: tuple[int, int] | None = None) -> tuple[dict[str, PassTexts], np.ndarray | None]:
    """``({pass: PassTexts}, AND weights or None)`` for the prompt: one pass per AND part (SDXL's second prompt,
    not split, goes with every part)."""
    parts, weights = and_parts(prompts)
    names = cond_parts(len(parts[0])) if weights is not None else (COND,)
    return {name: schedule_pass([p[k] for p in parts], prompts_2, num_steps, hires)
            for k, name in enumerate(names)}, weights
