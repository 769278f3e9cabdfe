"""Answer equivalence (Qwen2.5-Math math_equal semantics), the safe parser, and real gold answers.

Most cases call the unsandboxed internal function for speed; a few go through the public,
sandboxed ``is_equivalent`` / ``math_reward``.
"""

import json
import time
from pathlib import Path

import pytest
import sympy

from areal_async.reward import extract_answer, is_equivalent, math_reward
from areal_async.reward.equivalence import _equivalent_unsandboxed
from areal_async.reward.latex_parser import ParseError, parse_math

EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
needs_eval_data = pytest.mark.skipif(not EVAL_DIR.is_dir(), reason=f"no evaluation data at {EVAL_DIR}")


def _check(prediction, gold, expected):
    assert _equivalent_unsandboxed(prediction, gold) is expected, (prediction, gold)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("1,000", "1000", True),
        ("58500", "58,500", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1/2", r"\dfrac{1}{2}", True),
        (r"\tfrac34", "0.75", True),
        (r"\frac12", "1/2", True),
        ("-7", "-7.0", True),
        ("025", "25", True),
        ("27", "27.0", True),
        ("1/2", "1/3", False),
        ("0.5", r"\frac{1}{3}", False),
        ("-7", "7", False),
        ("1,000", "100", False),
        ("1", "100", False),  # the x100 / x0.01 variants need a percent sign
    ],
)
def test_numbers(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"50\%", "50", True),
        (r"50\%", "0.5", True),
        ("50%", "0.5", True),
        ("50", r"50\%", True),
        ("50 percent", "0.5", True),
        (r"51\%", "0.5", False),
        ("51%", "50%", False),
    ],
)
def test_percentages(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
        (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", True),
        (r"2\pi", r"\pi*2", True),
        ("x^2+2x+1", "(x+1)^2", True),
        (r"\frac{x}{7}+\frac{2}{7}", r"\frac{x+2}{7}", True),
        (r"\sin^2 x + \cos^2 x", "1", True),
        ("3.14159", r"\pi", True),  # constants compare numerically with relative tolerance 1e-4
        ("2i+1", "1+2i", True),
        (r"\sqrt[3]{-8}", "-2", True),
        ("2^10", "1024", True),
        ("x^2+1", "(x+1)^2", False),
        (r"\sqrt{2}", "1.41", False),
        (r"2\pi", r"3\pi", False),
        ("1+2i", "1-2i", False),
        ("p-q", "q-p", False),
    ],
)
def test_symbolic_expressions(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("(1,2)", "(1, 2)", True),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
        ("(0.5, 2)", r"(\frac12, 2)", True),
        ("[0, 1)", "[0,1)", True),
        (r"(-\infty, 0]", r"(-\infty,0]", True),
        (r"\{1,2,3\}", r"\{3,2,1\}", True),
        (r"\{1\pm\sqrt{5},-2\}", r"\{-2, 1+\sqrt5, 1-\sqrt5\}", True),
        ("-2,1", "1,-2", True),  # bare lists of solutions are unordered
        (r"1 \pm \sqrt{19}", r"1-\sqrt{19}, 1+\sqrt{19}", True),
        (r"(0,9) \cup (9,36)", r"(0, 9)\cup(9, 36)", True),
        ("(1,2)", "(2,1)", False),
        ("[0,1)", "[0,1]", False),
        ("(0,1)", "[0,1]", False),
        (r"\{1,2\}", r"\{1,3\}", False),
        (r"\{2,1\}", "(1,2)", False),  # against a gold tuple a set counts in order (math-verify; {1,2} matches)
        ("1,2", "1,2,3", False),
        (r"(0,9) \cup (9,36)", r"(0,9) \cup (9,37)", False),
        (r"1 \pm \sqrt{19}", r"1+\sqrt{19}", False),
    ],
)
def test_tuples_intervals_sets(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
        (r"\begin{bmatrix}1/3\\-2\end{bmatrix}", r"\begin{pmatrix} \frac{1}{3} \\ -2 \end{pmatrix}", True),
        (r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", r"\begin{bmatrix}1 & 0 \\ 0 & 1\end{bmatrix}", True),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\3\end{pmatrix}", False),
        (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", False),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1&2\end{pmatrix}", False),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", "(1,2)", False),
    ],
)
def test_matrices(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"5\text{ cm}", "5", True),
        (r"10 \mbox{ inches}", "10", True),
        (r"864 \mbox{ inches}^2", "864", True),
        ("5.4 cents", r"5.4 \text{ cents}", True),
        (r"\$32,\!348", "32348", True),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", True),
        (r"\text{Evelyn}", "evelyn", True),
        (r"\text{(C)}", "C", True),
        (r"5\text{ cm}", "6", False),
        ("3m", "3", False),  # a variable, not a unit
        (r"\text{Evelyn}", "Navin", False),
        ("even", "neve", False),  # words are not products of letters
    ],
)
def test_units_and_text(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"30^\circ", "30", True),
        (r"30^{\circ}", "30", True),
        ("30°", r"30^\circ", True),
        ("30 degrees", "30", True),
        (r"30^\circ", "60", False),
    ],
)
def test_degrees(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", r"[\frac{\pi^2}{8},\frac{5\pi^2}{4}]", True),
        (r"11,\! 111,\! 111,\! 100", "11111111100", True),
        (r"1\,000", "1000", True),
        ("$12$.", "12", True),
        (r"\pi r^2", r"r^2\pi", True),  # the space after a command survives
        (r"\cot x", r"\cotx", True),
        ("12.", "13", False),
    ],
)
def test_latex_noise(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("x = 3", "3", True),
        ("3", "x=5", False),
        ("5", "x=5", True),
        ("y = 2x + 3", "2x+3", True),
        (r"x \in [-2,7]", "[-2,7]", True),
        ("5x - 7y + 11z + 4 = 0", "-5x+7y-11z-4=0", True),
        ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z + 5 = 0", False),
        ("2x = 6", "3", False),  # only a lone variable on the left is dropped
    ],
)
def test_equations(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"\infty", r"\infty", True),
        ("infinity", r"\infty", True),
        (r"-\infty", r"\infty", False),
        ("-3", "-3", True),
        ("-3", "3", False),
    ],
)
def test_infinity_and_negatives(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("5", r"\boxed{5}", True),
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        ("18", "She makes 9 * 2 = $18.\n#### 18", True),
        ("1000", "#### 1,000", True),
        ("27", 27.0, True),  # AMC gold answers are JSON floats
        ("6", r"\boxed{5}", False),
        ("17", "#### 18", False),
        ("28", 27.0, False),
    ],
)
def test_gold_formats(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction",
    [
        "__import__('os').system('echo hi')",
        "lambda: 0",
        "9^9^9^9",
        r"9^{9^{9^{9}}}",
        r"x^{10^{100}}",
        "(" * 10_000 + "0" + ")" * 10_000,
        "0" * 1_000_000,
        "",
        None,
    ],
    ids=["import", "lambda", "power-tower", "braced-power-tower", "huge-exponent", "nesting", "1MB", "empty", "none"],
)
def test_unusable_predictions_are_unequal_and_fast(prediction):
    start = time.monotonic()
    assert _equivalent_unsandboxed(prediction, "0") is False
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    "text",
    ["__import__('os')", "lambda: 0", "9^9^9^9", r"(10^{999})^{10}", r"x^{10^{100}}", "(" * 200 + "1" + ")" * 200,
     "1" * 2000, "a.b", "x!", "f'(x)"],
)  # fmt: skip
def test_parser_refuses_unsupported_or_huge_input(text):
    with pytest.raises(ParseError):
        parse_math(text)


def test_parser_builds_sympy_objects():
    x = sympy.Symbol("x")
    assert parse_math(r"\frac{1}{2}x^2 + \sqrt{4}") == x**2 / 2 + 2
    assert parse_math(r"2\pi r") == 2 * sympy.pi * sympy.Symbol("r")
    assert parse_math(r"\log_2 8") == 3
    assert parse_math(r"e^{i\pi}") == -1
    assert parse_math(r"10^{999}") == sympy.Integer(10) ** 999


def test_public_is_equivalent_goes_through_the_sandbox():
    assert is_equivalent(r"\frac{\sqrt2}{2}", r"\sqrt{2}/2") is True
    assert is_equivalent("(1,2)", "(2,1)") is False
    assert math_reward(r"so \boxed{0.5}", [r"\frac12"], correct_reward=1.0, incorrect_reward=0.0) == 1.0


# ---------------------------------------------------------------------------
# Real gold answers
# ---------------------------------------------------------------------------


def _read_jsonl(name: str) -> list[dict]:
    with (EVAL_DIR / name).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


@needs_eval_data
def test_math500_solutions_match_their_answers():
    rows = _read_jsonl("math500.jsonl")[:100]
    failures = [
        (row["unique_id"], extract_answer(row["solution"]), row["answer"])
        for row in rows
        if not _equivalent_unsandboxed(extract_answer(row["solution"]), row["answer"])
    ]
    assert len(failures) <= 3, failures
    # Shifted pairs (the next row's gold) must almost never match: a false-positive check.
    shifted = [
        (extract_answer(row["solution"]), following["answer"])
        for row, following in zip(rows, rows[1:])
        if _equivalent_unsandboxed(extract_answer(row["solution"]), following["answer"])
    ]
    assert shifted == [("5", "x=5")]  # a genuine coincidence: 5 and x = 5


@needs_eval_data
def test_math500_through_the_pool():
    rows = _read_jsonl("math500.jsonl")[:8]
    rewards = [math_reward(row["solution"], [row["answer"]]) for row in rows]
    assert rewards == [5.0] * len(rows)
    assert math_reward(rows[0]["solution"], [rows[1]["answer"]]) == -5.0


@needs_eval_data
def test_amc23_float_golds():
    rows = _read_jsonl("amc23.jsonl")
    for row in rows:
        gold = row["answer"]
        assert isinstance(gold, float)
        assert _equivalent_unsandboxed(str(int(gold)), gold), gold
        assert _equivalent_unsandboxed(str(int(gold)), str(gold)), gold
        assert not _equivalent_unsandboxed(str(int(gold) + 1), gold), gold
    assert is_equivalent("27", "27.0")


@needs_eval_data
def test_aime24_leading_zero_golds():
    for row in _read_jsonl("aime24.jsonl"):
        assert _equivalent_unsandboxed(str(int(row["answer"])), row["answer"]), row["answer"]
        assert not _equivalent_unsandboxed(str(int(row["answer"]) + 1), row["answer"]), row["answer"]


@needs_eval_data
def test_gsm8k_golds():
    rows = _read_jsonl("gsm8k_test.jsonl")[:100]
    failures = [
        row["answer"][-80:] for row in rows if not _equivalent_unsandboxed(extract_answer(row["answer"]), row["answer"])
    ]
    assert not failures, failures


# The families where the verifier disagreed with graders' own test suites (issue 14), with hand-decided verdicts.
@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        # relations and inequalities
        (r"x \geq 5", "x >= 5", True),
        (r"5 \geq x", r"x \leq 5", True),
        ("-x > -1", "x < 1", True),
        (r"2x < 2", "x < 1", True),
        (r"x \neq 3", "x != 3", True),
        (r"3 \ne x", r"x \neq 3", True),
        (r"1 < x \le 3", r"3 \ge x > 1", True),
        ("x > 5", "x < 5", False),
        ("x > 5", r"x \ge 5", False),
        ("-x > 1", "x < 1", False),
        # approximations
        (r"x \approx 11", "11", True),
        (r"\frac{\sqrt3}{3} \approx 0.577", r"\frac{\sqrt3}{3}", True),
        (r"x \approx 12", "11", False),
        # mixed numbers
        (r"918\frac12", "918.5", True),
        (r"4\frac{2}{3}", r"\frac{14}{3}", True),
        (r"-2\frac{1}{2}", "-2.5", True),
        (r"4\frac{2}{3}", r"\frac{8}{3}", False),
        # labelled answers
        ("(p,q)=(3,2)", "(3,2)", True),
        ("V_1:V_2=11:21", "11:21", True),
        ("f(x)=1", "1", True),
        ("|AB|=1", "1", True),
        ("a=1, b=2", "(1,2)", True),
        ("(p,q)=(2,3)", "(3,2)", False),
        ("2x=6", "3", False),
        # equations equal after rearranging or scaling
        (r"y=-\frac12x+\frac34", "2x+4y-3=0", True),
        ("2y = 4x + 2", "y = 2x + 1", True),
        ("y = 2x + 2", "y = 2x + 1", False),
        ("x = 3", "y = 3", False),
        # sets and lists in other delimiters
        (r"\{-12,-11,-10\}", "-12;-11;-10", True),
        ("x=1 or x=2", r"\{1,2\}", True),
        (r"\{(1,2),(3,4)\}", r"\{(3,4),(1,2)\}", True),
        (r"\{(1,2),(3,4)\}", r"\{(4,3),(1,2)\}", False),
        # text around numbers
        (r"5\textbf{ cm}", "5", True),
        ("15 pct", "15", True),
        (r"\$10", "10", True),
        ("185\\", "185", True),
        (r"\\dfrac{1}{2}", r"\frac12", True),
        (r"11,\! 111", "11111", True),
        # matrices, products, arithmetic
        (r"\begin{array}{cc}1&2\\3&4\end{array}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
        ("ab", "ba", True),
        ("3+2", "5", True),
        # integers are exact: a relative tolerance would make these equal
        ("885441", "885442", False),
    ],
)
def test_graders_families(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        # a bracketed array against a pmatrix: the brackets are the matrix's own
        (r"\left[\begin{array}{cc}1&2\\3&4\end{array}\right]", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
        (r"\left(\begin{array}{c}1\\3\end{array}\right)", r"\begin{pmatrix}1\\3\end{pmatrix}", True),
        (r"\left[\begin{array}{cc}1&2\\3&5\end{array}\right]", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False),
        (r"\left[\begin{array}{cc}1&2\\3&4\end{array}\right)", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False),
        # a set against a tuple: in order against a gold tuple, in any order against a gold set (math-verify)
        (r"\{1,3\}", "(1,3)", True),
        (r"\{3,1\}", "(1,3)", False),
        ("(3,1)", r"\{1,3\}", True),
        (r"\{1,3\}", "[1,3]", False),  # an interval
        ("(1,4)", r"\{1,3\}", False),
        # a gold equation whose other side names a quantity without digits stands for its value
        (r"\frac{1}{\sqrt{6}}", r"NO/BO = \frac{1}{\sqrt{6}}", True),
        (r"\frac{\sqrt6}{6}", r"\frac{NO}{BO} = \frac{1}{\sqrt{6}}", True),
        ("5", "AB+BC=5", True),
        (r"\frac{1}{6}", r"NO/BO = \frac{1}{\sqrt{6}}", False),
        # an inequality on |z| against its union of intervals; either way round, as Conventions'
        # interval_equals_inequality has it for one variable (math-verify only when the gold is the inequality)
        (r"(-\infty,-2)\cup(2,\infty)", "|z| > 2", True),
        (r"(-\infty,-2]\cup[2,\infty)", r"|z| \ge 2", True),
        ("[-2,2]", r"|z| \le 2", True),
        ("(-2,2)", "2 > |x|", True),
        ("(-2,2)", "|z| > 2", False),
        (r"(-\infty,-2)\cup(2,\infty)", r"|z| \ge 2", False),
        ("|z| > 2", r"(-\infty,-2)\cup(2,\infty)", True),
    ],
)
def test_the_graders_last_families_as_math_verify_decides_them(prediction, gold, expected):
    _check(prediction, gold, expected)


def test_each_convention_decides_its_case():
    from areal_async.config import Conventions

    default = Conventions()
    assert _equivalent_unsandboxed(r"[5,\infty)", r"x \ge 5", default)
    assert _equivalent_unsandboxed(r"(1,3]", r"1 < x \le 3", default)
    assert not _equivalent_unsandboxed(r"[5,\infty)", r"x \ge 5", Conventions(interval_equals_inequality=False))
    assert _equivalent_unsandboxed(r"10\%", "0.1", default)
    assert not _equivalent_unsandboxed(r"10\%", "0.1", Conventions(percent_variants=False))
    assert _equivalent_unsandboxed(r"10\%", "10", Conventions(percent_variants=False))
    assert not _equivalent_unsandboxed("32, 349", "32349", default)
    assert _equivalent_unsandboxed("32, 349", "32349", Conventions(spaced_thousands=True))
    assert _equivalent_unsandboxed("1.4142", r"\sqrt2", default)
    assert not _equivalent_unsandboxed("1.4142", r"\sqrt2", Conventions(relative_tolerance=1e-6))


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("3", "x=3", True),
        ("1", "f(x)=1", True),
        ("(3,2)", "(p,q)=(3,2)", True),
        ("25", "x^2+y^2=25", False),  # the gold is the equation: its right side alone does not answer it
        ("x^2+y^2=25", "25", True),  # a labelled answer ("find x^2+y^2")
    ],
)
def test_a_gold_equation_stands_for_its_value_only_behind_a_label(prediction, gold, expected):
    _check(prediction, gold, expected)


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        (r"2 \le x \le 5", "[2,5]", True),
        (r"2 < x \le 5", "[2,5]", False),
        (r"x \in (-\infty, 2)", "x<2", True),
        ("1:2", r"\frac{1}{2}", True),
        ("2:1", r"\frac{1}{2}", False),
        ("11:21", "11:21", True),
    ],
)
def test_intervals_memberships_and_ratios(prediction, gold, expected):
    _check(prediction, gold, expected)
