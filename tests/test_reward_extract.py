"""Final-answer extraction: each strategy, the auto order, mode restriction, and hostile input."""

import time

import pytest

from areal_async.reward import EXTRACT_MODES, extract_answer


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so the value is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1}, then corrected: \boxed{2}", "2"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"$\boxed 5$", "5"),
        (r"\boxed -3.", "-3."),
        (r"\fbox{7}", "7"),
        (r"\boxed{ 12 } apples", "12"),
    ],
)
def test_boxed(text, expected):
    assert extract_answer(text, "boxed") == expected
    assert extract_answer(text) == expected


def test_boxed_unclosed_or_empty_is_none():
    assert extract_answer(r"\boxed{12", "boxed") is None
    assert extract_answer(r"\boxed{}", "boxed") is None
    assert extract_answer("no box here", "boxed") is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("So the answer is 42.", "42"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("The answer is 3.5.\nLater text 7", "3.5"),
        ("Therefore, the answer is: **18**", "18"),
        ("the answer is 1 and later the answer is 2", "2"),
    ],
)
def test_answer_is(text, expected):
    assert extract_answer(text, "answer_is") == expected
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("we find $x^2+1$ here", "x^2+1"),
        ("first $1$ then $$\\frac{3}{4}$$ done", "\\frac{3}{4}"),
        ("so \\(a+b\\) and finally \\[\\sqrt{2}\\]", "\\sqrt{2}"),
        ("adding, $2 + 3 = 5$", "5"),  # an equation ends in its value
        ("it is $\\pi$ and the price is \\$5", "\\pi"),  # escaped dollars are not math
        ("She pays $400 + $60 = 460 dollars", None),  # dollar amounts are not math
        ("unclosed $x + 1", None),
    ],
)
def test_latex(text, expected):
    assert extract_answer(text, "latex") == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("there are 12 eggs and 7 hens", "7"),
        ("a total of 1,234,567 apples", "1234567"),
        ("the temperature is -4 degrees", "-4"),
        ("it costs 2.50 today", "2.50"),
        ("about 3/4 of them", "3/4"),
        ("x-3", "3"),  # subtraction, not a negative number
        ("(1,23)", "23"),
    ],
)
def test_last_number(text, expected):
    assert extract_answer(text, "last_number") == expected
    assert extract_answer(text) == expected


def test_auto_order_prefers_boxed_then_answer_is_then_latex_then_number():
    text = "7 and $8$. The answer is 9. Hence \\boxed{10} and 11"
    assert extract_answer(text) == "10"
    assert extract_answer(text.replace("\\boxed{10}", "")) == "9"
    assert extract_answer("7 and $8$ and 11") == "8"
    assert extract_answer("7 and 11") == "11"


def test_mode_restricts_to_one_strategy():
    text = "So $y$ is 4. The answer is 5. Final Answer: the value is 7. Check: \\boxed{6}"
    # answer_tag reads a response without <answer> tags as auto does
    assert [extract_answer(text, mode) for mode in EXTRACT_MODES] == ["6", "6", "5", "7", "y", "6", "6"]
    assert extract_answer("only words", "last_number") is None
    assert extract_answer("only 5", "latex") is None
    with pytest.raises(ValueError):
        extract_answer("5", "unknown")


@pytest.mark.parametrize("text, expected", [
    (r"<think> so x = 3 </think> <answer> \frac{1}{2} </answer>", r"\frac{1}{2}"),  # all of it, not the last number
    (r"<think> 7 </think> <answer> so \boxed{12} and 5 </answer> then 9", "12"),  # a box inside the tag wins
    (r"<answer> 1 </answer> changed my mind <answer> 42 </answer>", "42"),  # the last tag
    (r"<answer> 8 <|im_end|> </answer> 9", "8"),  # the tag closes after the turn ended: auto on what is left
    (r"<answer>   </answer>", None),
])
def test_answer_tag_mode(text, expected):
    assert extract_answer(text, "answer_tag") == expected


def test_answer_tag_is_not_part_of_auto():
    assert extract_answer(r"<think> so x = 3 </think> <answer> \frac{1}{2} </answer>") == "2"  # the last number

def test_nothing_found_is_none():
    assert extract_answer("") is None
    assert extract_answer("I do not know.") is None


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1_000_000,
        "\\boxed{" * 200_000,
        "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",
        "$" * 500_000,
        "answer is " * 100_000,
        "111," * 250_000 + "1111",
    ],
    ids=["letters", "unclosed-boxes", "nested-braces", "dollars", "answer-is", "commas"],
)
def test_extraction_is_fast_on_hostile_text(text):
    start = time.monotonic()
    extract_answer(text)
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("text,expected", [
    ("Final Answer: The largest $n$ is 34.", "34"),
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("Final answer: 12", "12"),
    ("The final answer is $10,455$. I hope it is correct.", "10,455"),
    ("so \\boxed{7}<|im_end|>\n<|im_start|>user\nand \\boxed{9}", "7"),
    ("it is \\boxed{3}<｜end▁of▁sentence｜>\\boxed{4}", "3"),
])
def test_plain_text_endings_and_what_follows_the_turn(text, expected):
    assert extract_answer(text) == expected
