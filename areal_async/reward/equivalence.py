"""Answer equivalence in the manner of Qwen2.5-Math's ``math_equal``, without evaluating text.

After :func:`normalize_answer`, two answers are equal if, in this order:

1. their texts match (case-insensitively);
2. both are plain numbers within a relative tolerance of 1e-4; with a percent sign on either
   side the gold also counts as gold/100 and gold*100 (Qwen's include_percentage);
3. both are matrices of one shape with equal entries;
4. both are unions (``\\cup``) of pairwise equal parts;
5. both are collections with equal elements: tuples and intervals in order (the bracket types
   must match), sets and bare comma lists in any order (``a \\pm b`` counts as two elements);
6. both are equations whose sides' differences agree up to sign;
7. both parse (:mod:`latex_parser`) to sympy expressions that are identical, numerically close
   (constants), or whose difference expands or simplifies to zero.

An equation whose left side is a lone variable (``x = 3``, ``x \\in [0,1)``) is replaced by its
right side first. These functions do no sandboxing: call them inside the worker pool.
"""

from __future__ import annotations

import cmath
import re
from dataclasses import dataclass
from fractions import Fraction

import sympy

from areal_async.reward.extraction import extract_answer
from areal_async.reward.latex_parser import GREEK_LETTERS, ParseError, parse_math
from areal_async.reward.normalization import normalize_answer

MAX_ANSWER_CHARS = 1000  # the longest MATH-500 gold is 53 characters
MAX_COLLECTION_ITEMS = 64
MAX_STRUCTURE_DEPTH = 4
RELATIVE_TOLERANCE = 1e-4

_PERCENT = re.compile(r"%|\bpercent\b")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_LONE_VARIABLE = re.compile(
    r"(?:[a-zA-Z]|\\(?:%s))(?:_\{?[a-zA-Z0-9]+\}?)?(?:=|\\in(?![a-zA-Z]))(?P<value>[^=]+)"
    % "|".join(sorted(GREEK_LETTERS, key=len, reverse=True))
)
_WORD = re.compile(r"[a-zA-Z]{3,}")  # a name such as "Evelyn": compared as text, never as a product
_MATRIX = re.compile(r"\\begin\{pmatrix\}(?P<body>.*)\\end\{pmatrix\}", re.DOTALL)
_OPENERS = "([{"
_CLOSERS = ")]}"


@dataclass(frozen=True)
class _Collection:
    """Elements of a tuple/interval (``sequence``), a set, or a bracket-less comma ``list``."""

    kind: str
    brackets: str
    items: list[str]


def _equivalent_unsandboxed(prediction: str | None, gold: object) -> bool:
    """Whether ``prediction`` and ``gold`` denote the same answer. Not sandboxed.

    Either may be wrapped in ``\\boxed{}`` or be a GSM8K solution ending in ``#### <answer>``;
    a non-string gold (e.g. AMC's float ``27.0``) is compared through ``str``.
    """
    if prediction is None or gold is None:
        return False
    prediction_text, gold_text = _final_answer_text(str(prediction)), _final_answer_text(str(gold))
    if len(prediction_text) > MAX_ANSWER_CHARS or len(gold_text) > MAX_ANSWER_CHARS:
        return False
    percent = bool(_PERCENT.search(prediction_text) or _PERCENT.search(gold_text))
    normalized_prediction, normalized_gold = normalize_answer(prediction_text), normalize_answer(gold_text)
    if not normalized_prediction or not normalized_gold:
        return False
    return _normalized_equal(normalized_prediction, normalized_gold, percent, depth=0)


def _final_answer_text(answer: str) -> str:
    """The answer inside ``answer``: its last ``\\boxed{}`` content, or what follows ``####``."""
    if "\\boxed" in answer or "\\fbox" in answer:
        boxed = extract_answer(answer, mode="boxed")
        if boxed is not None:
            return boxed
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return answer


def _normalized_equal(prediction: str, gold: str, percent: bool, depth: int) -> bool:
    """Equivalence of two normalized answers (steps 1-7 of the module docstring)."""
    if depth > MAX_STRUCTURE_DEPTH:
        return False
    prediction, gold = _lone_variable_value(prediction), _lone_variable_value(gold)
    if prediction.lower() == gold.lower():
        return True
    prediction_number, gold_number = _plain_number(prediction), _plain_number(gold)
    if prediction_number is not None and gold_number is not None:
        return _close(prediction_number, gold_number, percent)
    prediction_matrix, gold_matrix = _matrix_cells(prediction), _matrix_cells(gold)
    if prediction_matrix is not None or gold_matrix is not None:
        return _matrices_equal(prediction_matrix, gold_matrix, percent, depth)
    prediction_union, gold_union = _top_level_split(prediction, "\\cup"), _top_level_split(gold, "\\cup")
    if len(prediction_union) > 1 or len(gold_union) > 1:
        return _sequences_equal(prediction_union, gold_union, percent, depth)
    prediction_collection, gold_collection = _collection(prediction), _collection(gold)
    if prediction_collection is not None or gold_collection is not None:
        return _collections_equal(prediction_collection, gold_collection, percent, depth)
    if prediction.count("=") == 1 and gold.count("=") == 1:
        return _equations_equal(prediction, gold)
    if "=" in prediction or "=" in gold or _WORD.fullmatch(prediction) or _WORD.fullmatch(gold):
        return False
    return _expressions_equal(prediction, gold, percent)


def _lone_variable_value(answer: str) -> str:
    """``x=3`` -> ``3`` and ``x\\in[0,1)`` -> ``[0,1)``; anything else unchanged."""
    match = _LONE_VARIABLE.fullmatch(answer)
    return match.group("value").strip() if match else answer


def _plain_number(answer: str) -> Fraction | None:
    """An integer or decimal (``1,000``, ``-0.5``, ``025``) as an exact fraction, else None."""
    if not _PLAIN_NUMBER.fullmatch(answer):
        return None
    return Fraction(answer.replace(",", ""))


def _close(prediction, reference, percent: bool) -> bool:
    """Relative-tolerance equality of two numbers (Fractions or complex), with Qwen's percent
    variants of the reference when a percent sign was present."""
    references = (reference, reference / 100, reference * 100) if percent else (reference,)
    return any(
        abs(prediction - candidate) <= RELATIVE_TOLERANCE * max(abs(prediction), abs(candidate))
        for candidate in references
    )


# ---------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------


def _top_level_split(text: str, separator: str = ",") -> list[str]:
    """Split at ``separator`` outside brackets; bracket types are not matched, so ``[0,1)`` nests."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(text):
        char = text[index]
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif depth == 0 and text.startswith(separator, index):
            parts.append(text[start:index])
            start = index + len(separator)
            index = start
            continue
        index += 1
    parts.append(text[start:])
    return parts


def _encloses(text: str) -> bool:
    """Whether the bracket opening ``text`` is closed by its last character."""
    if not text or text[0] not in _OPENERS:
        return False
    depth = 0
    for index, char in enumerate(text):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth == 0:
                return index == len(text) - 1
    return False


def _collection(answer: str) -> _Collection | None:
    """The answer as a collection of at least two elements, or None for a single value."""
    if _encloses(answer):
        items = _top_level_split(answer[1:-1])
        if len(items) < 2:
            return None
        kind = "set" if answer[0] == "{" else "sequence"
        return _Collection(kind, answer[0] + answer[-1], items)
    items = _top_level_split(answer)
    if len(items) >= 2 or any("\\pm" in item for item in items):
        return _Collection("list", "", items)
    return None


def _expand_plus_minus(items: list[str]) -> list[str]:
    """``1\\pm\\sqrt2`` -> ``1+\\sqrt2``, ``1-\\sqrt2`` (for unordered collections)."""
    expanded = []
    for item in items:
        if item.count("\\pm") == 1:
            expanded += [item.replace("\\pm", "+"), item.replace("\\pm", "-")]
        else:
            expanded.append(item)
    return expanded


def _collections_equal(
    prediction: _Collection | None, gold: _Collection | None, percent: bool, depth: int
) -> bool:
    """Tuples/intervals compare in order with matching brackets; a tuple against a bare list in
    order (Qwen strips the brackets); sets and bare lists in any order."""
    if prediction is None or gold is None:
        return False
    if prediction.kind == "sequence" or gold.kind == "sequence":
        if {prediction.kind, gold.kind} == {"sequence", "set"}:
            return False
        if prediction.kind == gold.kind and prediction.brackets != gold.brackets:
            return False
        return _sequences_equal(prediction.items, gold.items, percent, depth)
    return _unordered_equal(_expand_plus_minus(prediction.items), _expand_plus_minus(gold.items), percent, depth)


def _sequences_equal(prediction: list[str], gold: list[str], percent: bool, depth: int) -> bool:
    """Element-wise equality in order."""
    return len(prediction) == len(gold) and all(
        _normalized_equal(p, g, percent, depth + 1) for p, g in zip(prediction, gold)
    )


def _unordered_equal(prediction: list[str], gold: list[str], percent: bool, depth: int) -> bool:
    """Equality as multisets: each predicted element is matched to a distinct gold element."""
    if len(prediction) != len(gold) or len(gold) > MAX_COLLECTION_ITEMS:
        return False
    unmatched = list(gold)
    for item in prediction:
        match = next((i for i, g in enumerate(unmatched) if _normalized_equal(item, g, percent, depth + 1)), None)
        if match is None:
            return False
        del unmatched[match]
    return True


def _matrix_cells(answer: str) -> list[list[str]] | None:
    """Rows of cells of a ``pmatrix`` (bmatrix/array were renamed by normalization), else None."""
    match = _MATRIX.fullmatch(answer)
    if match is None or "\\begin" in match.group("body"):
        return None
    rows = [row for row in match.group("body").split("\\\\") if row.strip()]
    return [row.split("&") for row in rows]


def _matrices_equal(
    prediction: list[list[str]] | None, gold: list[list[str]] | None, percent: bool, depth: int
) -> bool:
    """Same shape and equal entries."""
    if prediction is None or gold is None or len(prediction) != len(gold):
        return False
    return all(_sequences_equal(p_row, g_row, percent, depth) for p_row, g_row in zip(prediction, gold))


# ---------------------------------------------------------------------------
# Symbolic comparison
# ---------------------------------------------------------------------------


def _equations_equal(prediction: str, gold: str) -> bool:
    """``a = b`` and ``c = d`` are equal if a - b equals c - d or d - c (Qwen's rule)."""
    try:
        prediction_difference = _equation_difference(prediction)
        gold_difference = _equation_difference(gold)
    except ParseError:
        return False
    return _sympy_equal(prediction_difference, gold_difference) or _sympy_equal(-prediction_difference, gold_difference)


def _equation_difference(equation: str) -> sympy.Expr:
    left, right = equation.split("=")
    return parse_math(left) - parse_math(right)


def _expressions_equal(prediction: str, gold: str, percent: bool) -> bool:
    """Parse both sides and compare them symbolically; unparseable means not equal."""
    try:
        prediction_value, gold_value = parse_math(prediction), parse_math(gold)
    except ParseError:
        return False
    return _sympy_equal(prediction_value, gold_value, percent)


def _sympy_equal(prediction: sympy.Expr, gold: sympy.Expr, percent: bool = False) -> bool:
    """Identical, numerically close (both constant), or a difference that simplifies to zero."""
    try:
        if prediction == gold:
            return True
        if not prediction.free_symbols and not gold.free_symbols:
            prediction_value, gold_value = complex(prediction.evalf(30)), complex(gold.evalf(30))
            # infinities are equal only when identical, which == above has decided
            finite = cmath.isfinite(prediction_value) and cmath.isfinite(gold_value)
            return finite and _close(prediction_value, gold_value, percent)
        difference = prediction - gold
        return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0
    except MemoryError:  # the worker's memory cap: a verdict that could not be computed, not "unequal"
        raise
    except Exception:  # sympy raises many unrelated error types on odd input; odd input is unequal
        return False
