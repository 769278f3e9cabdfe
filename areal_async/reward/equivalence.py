"""Answer equivalence in the manner of Qwen2.5-Math's ``math_equal``, without evaluating text.

After :func:`normalize_answer`, two answers are equal if, in this order:

1. their texts match (case-insensitively);
2. one side of an approximation (``x \\approx 11``, ``\\frac{\\sqrt3}{3} \\approx 0.577``) equals the other answer;
3. both are plain numbers (integers, decimals, mixed numbers such as ``918\\frac12``), equal if both are
   integers, else within a relative tolerance; with a percent sign on either side the gold also counts as
   gold/100 and gold*100 (Qwen's include_percentage; see areal_async.config.Conventions);
4. both are matrices of one shape with equal entries;
5. both are unions (``\\cup``) of pairwise equal parts;
6. both are collections with equal elements: tuples and intervals in order (the bracket types
   must match), sets and bare comma lists in any order (``a \\pm b`` counts as two elements), a set against a
   tuple in the gold's way (in order against a tuple, in any order against a set, as math-verify);
7. both are relations (``=``, ``<``, ``\\le``, ``>``, ``\\ge``, ``\\ne``, chains too) that say the same: for each
   link, the sides' differences agree up to a positive factor (``-x > -1`` is ``x < 1``, ``5 \\ge x`` is
   ``x \\le 5``), or any nonzero one for ``=`` and ``\\ne`` (``y=-\\frac12x+\\frac34`` is ``2x+4y-3=0``);
   when only one answer is a relation, an equation stands for its right side (a labelled answer:
   ``x=3``, ``f(x)=1``, ``(p,q)=(3,2)``, ``V_1:V_2=11:21``, ``NO/BO=\\frac1{\\sqrt6}``) and an inequality in one
   variable or its absolute value for its interval or union (``x \\ge 5`` is ``[5,\\infty)``, ``|z|>2`` is
   ``(-\\infty,-2)\\cup(2,\\infty)``; see Conventions);
8. both parse (:mod:`latex_parser`) to sympy expressions that are identical, numerically close
   (constants), or whose difference expands or simplifies to zero.

``x \\in S`` is replaced by ``S`` first. These functions do no sandboxing: call them inside the worker pool.
"""

from __future__ import annotations

import cmath
import re
from dataclasses import dataclass, field
from fractions import Fraction

import sympy

from areal_async.config import Conventions
from areal_async.reward.extraction import extract_answer
from areal_async.reward.latex_parser import GREEK_LETTERS, ParseError, parse_math
from areal_async.reward.normalization import normalize_answer

MAX_ANSWER_CHARS = 1000  # the longest MATH-500 gold is 53 characters
MAX_COLLECTION_ITEMS = 64
MAX_STRUCTURE_DEPTH = 4

_PERCENT = re.compile(r"%|\bpercent\b")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")  # thousands separators went in normalization
_MIXED_NUMBER = re.compile(
    r"(?P<sign>[+-]?)(?P<whole>\d+)\\frac(?:\{(?P<num>\d+)\}|(?P<num1>\d))(?:\{(?P<den>\d+)\}|(?P<den1>\d))"
)
_VARIABLE = r"(?:[a-zA-Z]|\\(?:%s))(?:_\{?[a-zA-Z0-9]+\}?)?" % "|".join(sorted(GREEK_LETTERS, key=len, reverse=True))
_LONE_VARIABLE = re.compile(_VARIABLE)
_ABSOLUTE_VARIABLE = re.compile(rf"\|{_VARIABLE}\|")
_FLIPPED = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "=": "=", "\\ne": "\\ne"}
# a quantity named without digits (NO/BO, \\frac{NO}{BO}, AB+BC): a gold equation's other side stands for it
_NAMED_QUANTITY = re.compile(r"[^0-9]*[a-zA-Z][^0-9]*")
# what names a value: x, f(x), |AB|, (p,q), V_1:V_2, \\angle ABC (an equation "label = value")
_LABEL = re.compile(rf"{_VARIABLE}(?:\([^()]*\))?|\|[^|]+\||\([^()]*\)|{_VARIABLE}(?::{_VARIABLE})+|\\angle[a-zA-Z]+")
_RATIO = re.compile(r"(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)")
_MEMBERSHIP = re.compile(rf"{_VARIABLE}\\in(?![a-zA-Z])(?P<value>.+)")
_RELATION = re.compile(r"\\(?:le|ge|ne)(?![a-zA-Z])|[<>=]")
# each relation as (kind, orientation): the link a OP b says kind(d) of d = a - b (orientation 1) or b - a (-1)
_RELATION_KINDS = {"<": ("positive", -1), "\\le": ("nonnegative", -1), ">": ("positive", 1),
                   "\\ge": ("nonnegative", 1), "=": ("zero", 1), "\\ne": ("nonzero", 1)}
_WORD = re.compile(r"[a-zA-Z]{3,}")  # a name such as "Evelyn": compared as text, never as a product
# a pmatrix, bare or inside the brackets of a normalized \\left[\\begin{array}...\\end{array}\\right]
_MATRIX = re.compile(r"(?P<open>[\[(]?)\\begin\{pmatrix\}(?P<body>.*)\\end\{pmatrix\}(?P<close>[\])]?)", re.DOTALL)
_MATRIX_BRACKETS = {("", ""), ("[", "]"), ("(", ")")}
_OPENERS = "([{"
_CLOSERS = ")]}"


@dataclass(frozen=True)
class _Collection:
    """Elements of a tuple/interval (``sequence``), a set, or a bracket-less comma ``list``."""

    kind: str
    brackets: str
    items: list[str]


@dataclass(frozen=True)
class _How:
    """How two answers are compared: the conventions, and whether a percent sign was seen on either side.
    `unparsed` records that a comparison met text the parser could not read."""

    conventions: Conventions
    percent: bool
    unparsed: list = field(default_factory=list)


def judge(prediction: str | None, gold: object, conventions: Conventions = Conventions()) -> tuple[bool, bool]:
    """(whether ``prediction`` and ``gold`` denote the same answer, whether a comparison met text that could
    not be parsed). Not sandboxed.

    Either may be wrapped in ``\\boxed{}`` or be a GSM8K solution ending in ``#### <answer>``;
    a non-string gold (e.g. AMC's float ``27.0``) is compared through ``str``.
    """
    if prediction is None or gold is None:
        return False, False
    prediction_text, gold_text = _final_answer_text(str(prediction)), _final_answer_text(str(gold))
    if len(prediction_text) > MAX_ANSWER_CHARS or len(gold_text) > MAX_ANSWER_CHARS:
        return False, True
    percent = conventions.percent_variants and bool(_PERCENT.search(prediction_text) or _PERCENT.search(gold_text))
    normalized_prediction = normalize_answer(prediction_text, conventions.spaced_thousands)
    normalized_gold = normalize_answer(gold_text, conventions.spaced_thousands)
    if not normalized_prediction or not normalized_gold:
        return False, False
    how = _How(conventions, percent)
    return _normalized_equal(normalized_prediction, normalized_gold, how, depth=0), bool(how.unparsed)


def _equivalent_unsandboxed(prediction: str | None, gold: object, conventions: Conventions = Conventions()) -> bool:
    """Whether ``prediction`` and ``gold`` denote the same answer (see `judge`). Not sandboxed."""
    return judge(prediction, gold, conventions)[0]


def _final_answer_text(answer: str) -> str:
    """The answer inside ``answer``: its last ``\\boxed{}`` content, or what follows ``####``."""
    if "\\boxed" in answer or "\\fbox" in answer:
        boxed = extract_answer(answer, mode="boxed")
        if boxed is not None:
            return boxed
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return answer


def _normalized_equal(prediction: str, gold: str, how: _How, depth: int) -> bool:
    """Equivalence of two normalized answers (steps 1-8 of the module docstring)."""
    if depth > MAX_STRUCTURE_DEPTH:
        return False
    prediction, gold = _unmixed(_membership_value(prediction)), _unmixed(_membership_value(gold))
    if prediction.lower() == gold.lower():
        return True
    prediction_ratio, gold_ratio = _RATIO.fullmatch(prediction), _RATIO.fullmatch(gold)
    if bool(prediction_ratio) != bool(gold_ratio):  # "1:2" against a value: the quotient
        prediction, gold = _quotient(prediction_ratio) or prediction, _quotient(gold_ratio) or gold
    if "\\approx" in prediction or "\\approx" in gold:
        return any(_normalized_equal(p, g, how, depth + 1)
                   for p in _approximation_sides(prediction) for g in _approximation_sides(gold))
    prediction_number, gold_number = _plain_number(prediction), _plain_number(gold)
    if prediction_number is not None and gold_number is not None:
        return _close(prediction_number, gold_number, how)
    prediction_matrix, gold_matrix = _matrix_cells(prediction), _matrix_cells(gold)
    if prediction_matrix is not None or gold_matrix is not None:
        return _matrices_equal(prediction_matrix, gold_matrix, how, depth)
    prediction_union, gold_union = _top_level_split(prediction, "\\cup"), _top_level_split(gold, "\\cup")
    if len(prediction_union) > 1 or len(gold_union) > 1:
        single = gold if len(gold_union) == 1 else prediction if len(prediction_union) == 1 else None
        if single is None or _relation(single) is None:  # against an inequality: its set, below
            return _sequences_equal(prediction_union, gold_union, how, depth)
    prediction_relation, gold_relation = _relation(prediction), _relation(gold)
    if prediction_relation is None and gold_relation is None or _top_level_split(prediction)[1:] \
            or _top_level_split(gold)[1:]:  # a list of relations ("a=1, b=2") is a collection
        prediction_collection, gold_collection = _collection(prediction), _collection(gold)
        if prediction_collection is not None or gold_collection is not None:
            return _collections_equal(prediction_collection, gold_collection, how, depth)
    if prediction_relation is not None and gold_relation is not None:
        return _relations_equal(prediction_relation, gold_relation, how)
    if prediction_relation is not None or gold_relation is not None:
        value = _relation_value(prediction_relation or gold_relation, how.conventions, gold_relation is not None)
        if value is None:
            return False
        if prediction_relation is not None:
            return _normalized_equal(value, gold, how, depth + 1)
        return _normalized_equal(prediction, value, how, depth + 1)
    if _WORD.fullmatch(prediction) or _WORD.fullmatch(gold):
        return False
    return _expressions_equal(prediction, gold, how)


def _quotient(ratio: re.Match | None) -> str | None:
    return None if ratio is None else f"\\frac{{{ratio.group(1)}}}{{{ratio.group(2)}}}"


def _membership_value(answer: str) -> str:
    """``x\\in[0,1)`` -> ``[0,1)``; anything else unchanged."""
    match = _MEMBERSHIP.fullmatch(answer)
    return match.group("value").strip() if match else answer


def _approximation_sides(answer: str) -> list[str]:
    """The sides of ``a \\approx b`` that are values (a lone variable stands for none); the answer itself
    when it is no approximation."""
    sides = [side for side in _top_level_split(answer, "\\approx") if side]
    values = [side for side in sides if not _LONE_VARIABLE.fullmatch(side)]
    return values or sides


def _unmixed(answer: str) -> str:
    """A mixed number as one fraction (``918\\frac12`` -> ``\\frac{1837}{2}``); anything else unchanged."""
    mixed = _MIXED_NUMBER.fullmatch(answer)
    if mixed is None:
        return answer
    denominator = int(mixed.group("den") or mixed.group("den1"))
    if denominator == 0:
        return answer
    value = int(mixed.group("whole")) + Fraction(int(mixed.group("num") or mixed.group("num1")), denominator)
    return f"{mixed.group('sign') if mixed.group('sign') == '-' else ''}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _plain_number(answer: str) -> Fraction | None:
    """An integer or decimal (``-0.5``, ``025``) as an exact fraction, else None."""
    return Fraction(answer) if _PLAIN_NUMBER.fullmatch(answer) else None


def _close(prediction, reference, how: _How) -> bool:
    """Equality of two numbers (Fractions or complex): two integers must be equal (a tolerance would make
    885441 equal 885442), others within the relative tolerance; with a percent sign seen, the reference
    also counts as reference/100 and reference*100 (Qwen's include_percentage)."""
    references = (reference, reference / 100, reference * 100) if how.percent else (reference,)
    return any(_numbers_equal(prediction, candidate, how.conventions.relative_tolerance) for candidate in references)


def _numbers_equal(prediction, reference, tolerance: float) -> bool:
    if _is_integer(prediction) and _is_integer(reference):
        return prediction == reference
    return abs(prediction - reference) <= tolerance * max(abs(prediction), abs(reference))


def _is_integer(value) -> bool:
    return isinstance(value, Fraction) and value.denominator == 1


# ---------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------


def _split_outside_brackets(text: str, separator: re.Pattern) -> tuple[list[str], list[str]]:
    """``text`` cut at every match of ``separator`` outside brackets: (the parts, the separators matched).
    Bracket types are not matched, so ``[0,1)`` nests."""
    parts, separators, depth, start, index = [], [], 0, 0, 0
    while index < len(text):
        char = text[index]
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif depth == 0 and (match := separator.match(text, index)) is not None:
            parts.append(text[start:index])
            separators.append(match.group())
            start = index = match.end()
            continue
        index += 1
    parts.append(text[start:])
    return parts, separators


def _top_level_split(text: str, separator: str = ",") -> list[str]:
    """Split at ``separator`` outside brackets."""
    return _split_outside_brackets(text, re.compile(re.escape(separator)))[0]


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


def _collections_equal(prediction: _Collection | None, gold: _Collection | None, how: _How, depth: int) -> bool:
    """Tuples/intervals compare in order with matching brackets; a tuple against a bare list in
    order (Qwen strips the brackets); sets and bare lists in any order; a set against a tuple in the gold's way
    (math-verify: in order against a gold tuple, in any order against a gold set)."""
    if prediction is None or gold is None:
        return False
    if {prediction.kind, gold.kind} == {"sequence", "set"}:  # as math-verify: a tuple's order counts, a set's not
        sequence = prediction if prediction.kind == "sequence" else gold
        if sequence.brackets != "()":  # [1,3] is an interval
            return False
        if gold.kind == "set":
            return _unordered_equal(prediction.items, gold.items, how, depth)
        return _sequences_equal(prediction.items, gold.items, how, depth)
    if prediction.kind == "sequence" or gold.kind == "sequence":
        if prediction.kind == gold.kind and prediction.brackets != gold.brackets:
            return False
        return _sequences_equal(prediction.items, gold.items, how, depth)
    return _unordered_equal(_expand_plus_minus(prediction.items), _expand_plus_minus(gold.items), how, depth)


def _sequences_equal(prediction: list[str], gold: list[str], how: _How, depth: int) -> bool:
    """Element-wise equality in order."""
    return len(prediction) == len(gold) and all(
        _normalized_equal(p, g, how, depth + 1) for p, g in zip(prediction, gold)
    )


def _unordered_equal(prediction: list[str], gold: list[str], how: _How, depth: int) -> bool:
    """Equality as multisets: each predicted element is matched to a distinct gold element."""
    if len(prediction) != len(gold) or len(gold) > MAX_COLLECTION_ITEMS:
        return False
    unmatched = list(gold)
    for item in prediction:
        match = next((i for i, g in enumerate(unmatched) if _normalized_equal(item, g, how, depth + 1)), None)
        if match is None:
            return False
        del unmatched[match]
    return True


def _matrix_cells(answer: str) -> list[list[str]] | None:
    """Rows of cells of a ``pmatrix`` (bmatrix/array were renamed by normalization), else None."""
    match = _MATRIX.fullmatch(answer)
    if match is None or "\\begin" in match.group("body") or (match["open"], match["close"]) not in _MATRIX_BRACKETS:
        return None
    rows = [row for row in match.group("body").split("\\\\") if row.strip()]
    return [row.split("&") for row in rows]


def _matrices_equal(prediction: list[list[str]] | None, gold: list[list[str]] | None, how: _How, depth: int) -> bool:
    """Same shape and equal entries."""
    if prediction is None or gold is None or len(prediction) != len(gold):
        return False
    return all(_sequences_equal(p_row, g_row, how, depth) for p_row, g_row in zip(prediction, gold))


# ---------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------


def _relation(answer: str) -> tuple[list[str], list[str]] | None:
    """``a < b \\le c`` as its sides ``[a, b, c]`` and relations ``["<", "\\le"]`` (split outside brackets);
    None when the answer holds no relation."""
    sides, relations = _split_outside_brackets(answer, _RELATION)
    sides = [side.strip() for side in sides]
    return (sides, relations) if relations and all(sides) else None


def _links(relation: tuple[list[str], list[str]]) -> list[tuple[str, sympy.Expr]]:
    """Each link ``a OP b`` as (kind, d): "positive" d > 0, "nonnegative" d >= 0, "zero", "nonzero"."""
    sides, relations = relation
    links = []
    for left, symbol, right in zip(sides, relations, sides[1:]):
        kind, orientation = _RELATION_KINDS[symbol]
        links.append((kind, orientation * (parse_math(left) - parse_math(right))))
    return links


def _relations_equal(prediction: tuple[list[str], list[str]], gold: tuple[list[str], list[str]], how: _How) -> bool:
    """Same number of links, each matched to a distinct gold link of the same kind whose difference is a
    positive multiple of its own (any nonzero multiple for "zero" and "nonzero")."""
    try:
        prediction_links, gold_links = _links(prediction), _links(gold)
    except ParseError:
        how.unparsed.append(True)
        return False
    if len(prediction_links) != len(gold_links):
        return False
    unmatched = list(gold_links)
    for kind, difference in prediction_links:
        match = next((i for i, (gold_kind, gold_difference) in enumerate(unmatched)
                      if gold_kind == kind and _proportional(difference, gold_difference, kind)), None)
        if match is None:
            return False
        del unmatched[match]
    return True


def _proportional(difference: sympy.Expr, gold: sympy.Expr, kind: str) -> bool:
    """Whether ``difference`` is a constant multiple of ``gold``: positive for an inequality."""
    try:
        if gold == 0 or difference == 0:
            return gold == difference
        ratio = sympy.simplify(difference / gold)
        if ratio.free_symbols or not ratio.is_number or ratio == 0:
            return False
        return bool(ratio > 0) if kind in ("positive", "nonnegative") else bool(ratio.is_finite)
    except MemoryError:
        raise
    except Exception:  # sympy's many error types on odd input: not proportional
        return False


def _relation_value(relation: tuple[list[str], list[str]], conventions: Conventions, is_gold: bool) -> str | None:
    """What a relation stands for next to an answer that is none: an equation its right side (``x=3`` ->
    ``3``; a lone variable on the right takes the left) - a gold equation only when its other side is a label
    (``x=3``, ``f(x)=1``) or, as math-verify, a quantity named without digits (``NO/BO=\\frac1{\\sqrt6}``,
    ``AB+BC=5``; not ``x^2+y^2=25``, whose right side alone does not answer it) -, an inequality in one
    variable or its absolute value its interval or union (when conventions.interval_equals_inequality); else
    None."""
    sides, relations = relation
    if relations == ["="]:
        left, right = sides
        if _LONE_VARIABLE.fullmatch(right) and not _LONE_VARIABLE.fullmatch(left):
            left, right = right, left
        return right if not is_gold or _LABEL.fullmatch(left) or _NAMED_QUANTITY.fullmatch(left) else None
    if "=" in relations or "\\ne" in relations or not conventions.interval_equals_inequality:
        return None
    return _interval(sides, relations)


def _interval(sides: list[str], relations: list[str]) -> str | None:
    """``x \\ge 5`` -> ``[5,\\infty)``, ``1 < x \\le 3`` -> ``(1,3]``, ``5 > x`` -> ``(-\\infty,5)``,
    ``|z| > 2`` -> ``(-\\infty,-2)\\cup(2,\\infty)``; None unless one lone variable (or its absolute value) is
    bounded by the other sides."""
    absolute = [index for index, side in enumerate(sides) if _ABSOLUTE_VARIABLE.fullmatch(side)]
    if len(sides) == 2 and len(absolute) == 1:
        bound = sides[1 - absolute[0]]
        symbol = relations[0] if absolute[0] == 0 else _FLIPPED[relations[0]]  # as |v| OP bound
        negated = f"-{bound}" if _PLAIN_NUMBER.fullmatch(bound) else f"-({bound})"
        opener, closer = ("(", ")") if symbol in ("<", ">") else ("[", "]")
        if symbol in ("<", "\\le"):
            return f"{opener}{negated},{bound}{closer}"
        return f"(-\\infty,{negated}{closer}\\cup{opener}{bound},\\infty)"
    if all(symbol in (">", "\\ge") for symbol in relations):  # read it the other way round: a < ... < b
        sides, relations = sides[::-1], ["<" if symbol == ">" else "\\le" for symbol in relations]
    if not all(symbol in ("<", "\\le") for symbol in relations):
        return None
    variables = [index for index, side in enumerate(sides) if _LONE_VARIABLE.fullmatch(side)]
    if len(variables) != 1:
        return None
    at = variables[0]
    if len(sides) == 2:
        lower, upper = ("-\\infty", sides[1]) if at == 0 else (sides[0], "\\infty")
        strict = relations[0] == "<"
        opener = "(" if at == 0 or strict else "["
        closer = ")" if at == 1 or strict else "]"
        return f"{opener}{lower},{upper}{closer}"
    if len(sides) == 3 and at == 1:
        opener = "(" if relations[0] == "<" else "["
        closer = ")" if relations[1] == "<" else "]"
        return f"{opener}{sides[0]},{sides[2]}{closer}"
    return None


# ---------------------------------------------------------------------------
# Symbolic comparison
# ---------------------------------------------------------------------------


def _expressions_equal(prediction: str, gold: str, how: _How) -> bool:
    """Parse both sides and compare them symbolically; unparseable means not equal."""
    try:
        prediction_value, gold_value = parse_math(prediction), parse_math(gold)
    except ParseError:
        how.unparsed.append(True)
        return False
    return _sympy_equal(prediction_value, gold_value, how)


def _sympy_equal(prediction: sympy.Expr, gold: sympy.Expr, how: _How) -> bool:
    """Identical, numerically close (both constant), or a difference that simplifies to zero."""
    try:
        if prediction == gold:
            return True
        if not prediction.free_symbols and not gold.free_symbols:
            prediction_value, gold_value = complex(prediction.evalf(30)), complex(gold.evalf(30))
            # infinities are equal only when identical, which == above has decided
            finite = cmath.isfinite(prediction_value) and cmath.isfinite(gold_value)
            return finite and _close(prediction_value, gold_value, how)
        difference = prediction - gold
        return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0
    except MemoryError:  # the worker's memory cap: a verdict that could not be computed, not "unequal"
        raise
    except Exception:  # sympy raises many unrelated error types on odd input; odd input is unequal
        return False
