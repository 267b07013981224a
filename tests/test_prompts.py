"""sdjax.prompts against AUTOMATIC1111's documented behaviour: the doctest examples in its
modules/prompt_parser.py (parse_prompt_attention, get_learned_conditioning_prompt_schedules), the example in
modules/extra_networks.py, and the rules of its get_multicond_prompt_list."""

from __future__ import annotations

import pytest

from sdjax.prompts import (
    ExtraNetwork,
    active_entry,
    extract_extra_networks,
    parse_prompt_attention,
    prompt_schedule,
    split_and,
)

# A1111's parse_prompt_attention docstring, verbatim.
ATTENTION_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_EXAMPLES)
def test_attention_docstring_examples(text, expected):
    assert parse_prompt_attention(text) == expected  # exact floats, as A1111's doctest compares them


@pytest.mark.parametrize(("text", "expected"), [
    ("[x]", [["x", 1 / 1.1]]),
    ("(x:0.5) y", [["x", 0.5], [" y", 1.0]]),
    ("(x: 1.5 )", [["x", 1.5]]),  # spaces around the weight
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a BREAKfast", [["a BREAKfast", 1.0]]),  # BREAK only as a word
    ("a) b]", [["a) b]", 1.0]]),  # closers nothing opened stay text
    ("\\\\x", [["\\x", 1.0]]),
    ("", [["", 1.0]]),
])
def test_attention_rules(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


# A1111's get_learned_conditioning_prompt_schedules docstring (steps=10), verbatim.
SCHEDULE_EXAMPLES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize(("text", "expected"), SCHEDULE_EXAMPLES)
def test_schedule_docstring_examples(text, expected):
    assert prompt_schedule(text, 10) == expected


def test_schedule_docstring_hires_examples():
    # The docstring's second part: get_learned_conditioning_prompt_schedules([p], 10, 10)
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [[10, "a b c"]]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [[5, "a  c"], [10, "a b c"]]


def test_schedule_docstring_example_marked_not_handled():
    # The docstring lists g("a [{b|d{:.5] c") with the comment "not handling this right now"; A1111's grammar
    # rejects the "|" outside an alternation, so the current code (and sdjax) keep the prompt as it is.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [[10, "a [{b|d{:.5] c"]]


def test_schedule_comment_example():
    # The example in the comment at the top of A1111's prompt_parser.py (steps=100).
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(text, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


@pytest.mark.parametrize(("text", "steps", "expected"), [
    ("a [b:c:2.]", 10, [[10, "a b"]]),  # "2." has a decimal point: 2.0 x steps, capped at the last step
    ("a [b:c:1e1]", 10, [[10, "a b"]]),  # an integer in exponent form: step 10
    ("a [b:c:0]", 10, [[10, "a c"]]),
    ("a [b:c:-1]", 10, [[10, "a c"]]),
    ("a [b:c:0.25]", 7, [[1, "a b"], [7, "a c"]]),  # int(0.25 * 7) = 1
    ("a [b:c:2] [d:e:0.5]", 6, [[2, "a b d"], [3, "a c d"], [6, "a c e"]]),
    ("[a::2]", 10, [[2, "a"], [10, ""]]),
    ("a | b", 10, [[10, "a | b"]]),  # a "|" outside [...] does not parse: the prompt stays as written
    ("[a:b:2:3]", 10, [[10, "[a:b:2:3]"]]),
    ("x(y[a:2]z)w", 10, [[2, "x(yz)w"], [10, "x(yaz)w"]]),
    ("[[a:b:2]:c:3]", 10, [[2, "a"], [3, "b"], [10, "c"]]),
])
def test_schedule_rules(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


def test_active_entry_follows_a1111_step_counting():
    # A1111's reconstruct_cond_batch at CFGDenoiser.step (0, 1, ...): the first entry with step <= its end.
    schedule = prompt_schedule("a [b:c:3]", 10)  # [[3, 'a b'], [10, 'a c']]
    assert [active_entry(schedule, i) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    alternating = prompt_schedule("[x|y]", 4)
    assert [alternating[active_entry(alternating, i)][1] for i in range(4)] == ["x", "x", "y", "x"]


def test_schedule_errors():
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)
    with pytest.raises(TypeError):
        prompt_schedule(None, 10)


@pytest.mark.parametrize(("text", "expected"), [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat :1.5 AND a dog:-0.5", [("a cat", 1.5), (" a dog", -0.5)]),
    ("a cat AND a dog : .25 ", [("a cat", 1.0), (" a dog", 0.25)]),
    ("ANDROID AND x:2.", [("ANDROID", 1.0), (" x", 2.0)]),  # AND only as a word
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),  # emphasis is not a weight
])
def test_split_and(text, expected):
    assert split_and(text) == expected


def test_extra_networks_docstring_example():
    # A1111's ExtraNetwork.activate docstring: "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> ..."
    text, found = extract_extra_networks("1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
    assert text == "1girl,   "
    assert found == [ExtraNetwork("hypernet", "agm", ("1.1",)), ExtraNetwork("extrasupernet", "master",
                                                                             ("12", "13", "14")),
                     ExtraNetwork("hypernet", "ray", ())]
    assert found[0].multiplier() == 1.1 and found[2].multiplier() == 1.0


def test_extra_networks_named_args_and_non_tags():
    text, found = extract_extra_networks("<lora:my-lora_v2:0.8:te=0.5> a <b> c <lora:>")
    assert text == " a <b> c <lora:>"
    assert found == [ExtraNetwork("lora", "my-lora_v2", ("0.8", "te=0.5"))]
    assert found[0].multiplier() == 0.8
