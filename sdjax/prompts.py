"""Prompt syntax as AUTOMATIC1111's web UI reads it.

- :func:`parse_prompt_attention`: emphasis. ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``, nesting, ``\\(`` escapes,
  brackets left open are closed at the end, equal-weight runs merged; ``BREAK`` becomes a ``["BREAK", -1]`` marker.
- :func:`prompt_schedule`: prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and alternation
  ``[a|b]``, as the list of ``[last_step, text]`` A1111's ``get_learned_conditioning_prompt_schedules`` gives.
- :func:`split_and`: composable diffusion's ``a AND b:0.5``.
- :func:`extract_extra_networks`: ``<lora:name:0.8>`` / ``<hypernet:name:1.0>`` tags.

The rules (including their odd corners) are A1111's; the implementations are sdjax's own. The schedule grammar is
parsed by hand instead of with a parser generator: a prompt either parses as a whole (then ``[...]`` constructs are
interpreted) or is kept literally, as A1111 keeps a prompt its grammar rejects (e.g. a ``|`` outside ``[...]``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

__all__ = [
    "ExtraNetwork",
    "active_entry",
    "extract_extra_networks",
    "parse_prompt_attention",
    "prompt_schedule",
    "split_and",
    "step_prompts",
]

# --- emphasis ----------------------------------------------------------------------------------------------------

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ("BREAK", -1.0)

# One token of the emphasis syntax per match, in priority order: escapes (a backslash before anything else is
# dropped), openers, a weighted closer ``:1.3)``, closers, runs of ordinary text, a lone colon.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]? |
    [(\[] |
    :\s*(?P<weight>[+-]?[.\d]+)\s*\) |
    [)\]] |
    [^\\()\[\]:]+ |
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` for a prompt with A1111's emphasis syntax; ``["BREAK", -1]`` marks a ``BREAK``.

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    res: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token in "([":
            (open_round if token == "(" else open_square).append(len(res))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt {text!r}: emphasis weight {weight!r} is not a number") from None
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a closer nothing opened (kept as text)
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    res.append(list(BREAK_MARKER))
                res.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def is_break(item: list | tuple) -> bool:
    """Whether an item of :func:`parse_prompt_attention` is a ``BREAK`` (a BREAK inside brackets is text)."""
    return item[0] == "BREAK" and item[1] == -1


# --- prompt editing and alternation ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Scheduled:
    before: list | None
    after: list
    when: str


@dataclasses.dataclass
class _Alternate:
    options: list[list]


class _Rejected(Exception):
    """The prompt does not parse; A1111 then uses it as it is."""


# A1111 reads `when` with lark's SIGNED_NUMBER: optional sign, integer, decimal or exponent forms.
_NUMBER = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*")
_SPECIAL = "\\[]():|"


class _ScheduleParser:
    """Recursive descent over the editing grammar. Inside brackets every bracket must balance; at the top level
    a bracket or colon that starts no valid construct is plain text. A ``|`` is only valid in ``[a|b]``."""

    def __init__(self, text: str):
        self.text = text

    def top(self) -> list:
        nodes: list = []
        pos, n = 0, len(self.text)
        while pos < n:
            c = self.text[pos]
            if c in "([":
                try:
                    node, end = self._construct(pos)
                except _Rejected:
                    nodes.append(c)  # an unmatched opener at the top level is text
                    pos += 1
                    continue
                nodes.append(node)
                pos = end
            elif c in ")]:":
                nodes.append(c)
                pos += 1
            else:
                text, pos = self._plain(pos)
                nodes.append(text)
        return nodes

    def _plain(self, pos: int) -> tuple[str, int]:
        """Text up to the next special character; backslash escapes any character but a newline."""
        start, n = pos, len(self.text)
        while pos < n and self.text[pos] not in _SPECIAL:
            pos += 1
        while pos < n and self.text[pos] == "\\":
            if pos + 1 >= n or self.text[pos + 1] == "\n":
                raise _Rejected
            pos += 2
            while pos < n and self.text[pos] not in _SPECIAL:
                pos += 1
        if pos == start and pos < n and self.text[pos] == "|":
            raise _Rejected
        return self.text[start:pos], pos

    def _prompt(self, pos: int) -> tuple[list, int]:
        """A bracket-balanced prompt; stops before ``)``, ``]``, ``:``, ``|`` or the end."""
        nodes: list = []
        n = len(self.text)
        while pos < n:
            c = self.text[pos]
            if c in ")]:|":
                break
            if c in "([":
                node, pos = self._construct(pos)
            else:
                node, pos = self._plain(pos)
            nodes.append(node)
        return nodes, pos

    def _expect(self, pos: int, chars: str) -> str:
        if pos >= len(self.text) or self.text[pos] not in chars:
            raise _Rejected
        return self.text[pos]

    def _construct(self, pos: int) -> tuple[object, int]:
        """``(p)``, ``(p:p)``, ``[p]`` (all kept as text), ``[p:N]``, ``[p:p:N]`` or ``[p|p|...]``."""
        opener = self.text[pos]
        first, pos = self._prompt(pos + 1)
        if opener == "(":
            if self._expect(pos, "):") == ")":
                return ["(", *first, ")"], pos + 1
            second, pos = self._prompt(pos + 1)
            self._expect(pos, ")")
            return ["(", *first, ":", *second, ")"], pos + 1
        sep = self._expect(pos, "]:|")
        if sep == "]":
            return ["[", *first, "]"], pos + 1
        if sep == "|":
            options = [first]
            while self.text[pos] == "|":
                option, pos = self._prompt(pos + 1)
                options.append(option)
                self._expect(pos, "|]")
            return _Alternate(options), pos + 1
        # "[first:" then either "N]" (first is what comes in at step N) or "second:N]"
        when = self._number(pos + 1)
        if when is not None:
            return _Scheduled(None, first, when[0]), when[1]
        second, pos = self._prompt(pos + 1)
        self._expect(pos, ":")
        when = self._number(pos + 1)
        if when is None:
            raise _Rejected
        return _Scheduled(first, second, when[0]), when[1]

    def _number(self, pos: int) -> tuple[str, int] | None:
        """``(number text, position after "]")`` when a number and ``]`` follow, else None."""
        end = self.text.find("]", pos)
        if end < 0:
            return None
        match = _NUMBER.fullmatch(self.text, pos, end)
        return (match.group(1), end + 1) if match else None


def _when_step(when: str, steps: int, int_offset: int, float_offset: float) -> int:
    # Current A1111: a number written with a decimal point is a fraction of the steps, an integer a step number.
    value = float(when)
    value = (value - float_offset) * steps if "." in when else value - int_offset
    return min(steps, int(value))


def _render(nodes: list, step: int, whens: dict[int, int]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            out.append(_render(node, step, whens))
        elif isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= whens[id(node)] else node.after
            out.append(_render(chosen, step, whens))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(out)


def _walk(nodes: list):
    for node in nodes:
        if isinstance(node, list):
            yield from _walk(node)
        elif isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def prompt_schedule(text: str, steps: int, hires_steps: int | None = None) -> list[list]:
    """``[[last_step, prompt_text], ...]``: the prompt to use up to and including each step (steps count from 1).

    ``[from:to:when]`` switches at ``when``; ``[to:when]`` adds text from ``when`` on, ``[from::when]`` removes it.
    ``when`` with a decimal point (``0.25``, ``.5``) is a fraction of ``steps``, otherwise a step number.
    ``[a|b|c]`` cycles through its options every step. ``hires_steps``: the schedule of a hires-fix second pass
    (A1111: integers count on from the first pass's ``steps``, fractions from 1.0).

    >>> prompt_schedule("a [b:c:0.5]", 10)
    [[5, 'a b'], [10, 'a c']]
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    int_offset, float_offset, total = 0, 0.0, steps
    if hires_steps is not None:
        if not isinstance(hires_steps, int) or hires_steps < 1:
            raise ValueError(f"hires_steps must be a positive integer, got {hires_steps!r}")
        int_offset, float_offset, total = steps, 1.0, hires_steps
    try:
        nodes = _ScheduleParser(text).top()
    except _Rejected:
        return [[total, text]]
    ends, whens = {total}, {}
    for node in _walk(nodes):
        if isinstance(node, _Scheduled):
            whens[id(node)] = step = _when_step(node.when, total, int_offset, float_offset)
            if step >= 1:
                ends.add(step)
        else:
            ends.update(range(1, total + 1))
    return [[end, _render(nodes, end, whens)] for end in sorted(ends)]


def active_entry(schedule: list[list], step: int) -> int:
    """Index into ``schedule`` (from :func:`prompt_schedule`) of the prompt A1111 conditions on at sampler call
    ``step``, counted from 0 (A1111's CFGDenoiser.step): the first entry with ``step <= last_step``.

    >>> [active_entry(prompt_schedule("[a|b]", 4), i) for i in range(4)]
    [0, 0, 1, 2]
    """
    for index, (last_step, _) in enumerate(schedule):
        if step <= last_step:
            return index
    return 0


def step_prompts(text: str, steps: int, hires_steps: int | None = None) -> list[str]:
    """The prompt text A1111 conditions on at each sampler call 0 .. ``steps - 1`` (editing and alternation
    resolved): ``prompt_schedule`` read through :func:`active_entry`. With ``hires_steps``: at each call
    0 .. ``hires_steps - 1`` of a hires fix's second pass (``steps``: the first pass's).

    >>> step_prompts("a [b:c:0.5]", 4)
    ['a b', 'a b', 'a b', 'a c']
    """
    schedule = prompt_schedule(text, steps, hires_steps)
    return [schedule[active_entry(schedule, step)][1] for step in range(hires_steps or steps)]


# --- AND ---------------------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_TRAILING_WEIGHT = re.compile(r"(?P<text>.*?)(?:\s*:\s*(?P<weight>[-+]?(?:\d+(?:\.\d*)?|\.\d+)))?\s*", re.S)


def split_and(text: str) -> list[tuple[str, float]]:
    """Composable diffusion: ``"a cat AND a dog:0.5"`` -> ``[("a cat", 1.0), (" a dog", 0.5)]``.

    As A1111: split on the word ``AND``; a trailing ``:number`` is that part's weight (default 1.0); the text keeps
    its leading whitespace and loses its trailing whitespace. A1111 splits only the positive prompt.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    parts = []
    for part in _AND.split(text):
        match = _TRAILING_WEIGHT.fullmatch(part)
        weight = match.group("weight")
        parts.append((match.group("text"), float(weight) if weight is not None else 1.0))
    return parts


# --- extra networks ----------------------------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetwork(NamedTuple):
    """One ``<kind:name:arg:...>`` tag: ``kind`` ("lora", "hypernet", ...), ``name``, the other arguments as text
    (positional ones, and ``key=value`` ones as written)."""

    kind: str
    name: str
    args: tuple[str, ...]

    def multiplier(self, default: float = 1.0) -> float:
        """The first positional argument as a number (A1111's strength), else ``default``."""
        positional = [a for a in self.args if "=" not in a]
        return float(positional[0]) if positional else default


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetwork]]:
    """``(prompt without the tags, [ExtraNetwork, ...])`` for A1111's ``<lora:name:0.8>`` style tags, in order.

    As A1111's ``extra_networks.parse_prompt``: a tag is ``<word:anything but '>'>``, split at colons; the tag is
    removed and nothing else (the spaces around it stay).
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    found: list[ExtraNetwork] = []

    def take(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        found.append(ExtraNetwork(match.group(1), name, tuple(args)))
        return ""

    return _EXTRA_NETWORK.sub(take, text), found
