"""Canonical text form of a final answer, following Qwen2.5-Math's ``strip_string`` in spirit.

The result keeps the mathematical content and drops presentation: dollar signs, ``\\left``/``\\right``,
thin spaces, ``\\text{}`` wrappers, trailing units, degree marks, percent signs, ``\\dfrac``
spelling, a doubled backslash before a command, thousands separators, zero decimals (``27.0``) and spaces.
Relations get one spelling each (``\\le``, ``\\ge``, ``\\ne``, ``<``, ``>``) and list separators one (``,``).
Structure (tuples, sets, matrices, relations) is left for :mod:`areal_async.reward.equivalence` to interpret.
"""

from __future__ import annotations

import re

UNIT_WORDS = frozenset(
    """
    mm cm m km in inch inches ft foot feet yd yard yards mi mile miles meter meters metre metres
    millimeter millimeters centimeter centimeters kilometer kilometers square sq cubic unit units
    mg g kg gram grams kilogram kilograms lb lbs pound pounds oz ounce ounces ton tons
    l ml liter liters litre litres gallon gallons s sec secs second seconds min mins minute minutes
    h hr hrs hour hours day days week weeks month months year years mph kph per pct
    dollar dollars cent cents degree degrees deg radian radians percent
    """.split()
)

_SPACING = re.compile(r"\\\\|\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")
# "\\dfrac" written with its backslash escaped once too often (a row break "\\" never precedes a command)
_DOUBLED_BACKSLASH = re.compile(
    r"\\\\(?=(?:[dtc]?frac|sqrt|pi|infty|cdot|times|div|text|mathrm|boxed|left|right|le|ge|ne|approx|pm)(?![a-zA-Z]))"
)
_LATEX_THOUSANDS = re.compile(r"\{,\}|,\\!\s*")  # "10{,}455", "11,\\! 111": a separator, whatever the spaces
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?!\d)")
_SPACED_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:, \d{3})+(?![\d,])")
_ASCII_RELATIONS = (("<=", "\\le "), (">=", "\\ge "), ("!=", "\\ne "), ("≤", "\\le "), ("≥", "\\ge "), ("≠", "\\ne "))
_FRACTION_SPELLINGS = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_MATRIX_BEGIN = re.compile(r"\\begin\{(?:bmatrix|array\}\{[^{}]*)\}")
_MATRIX_END = re.compile(r"\\end\{(?:bmatrix|array)\}")
_SIZED_DELIMITERS = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])")
_VARIANT_SPELLINGS = re.compile(r"\\(?P<name>neq|leqslant|geqslant|leq|geq|lt|gt|varnothing)(?![a-zA-Z])")
_CANONICAL_SPELLINGS = {"neq": "\\ne", "leq": "\\le", "geq": "\\ge", "leqslant": "\\le", "geqslant": "\\ge",
                        "lt": "<", "gt": ">", "varnothing": "\\emptyset"}
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z])")
_TRAILING_TEXT_UNIT = re.compile(
    r"^(?P<value>.*?)\s*\\(?:text|mbox|mathrm|textrm|textbf|textit|mathbf)\s*\{[^{}]*\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?$"
)
_TRAILING_UNIT_WORDS = re.compile(
    r"^(?P<value>.*?[\d}).])\s+(?P<units>[a-zA-Z]+(?:\s+[a-zA-Z]+)*)\.?(?:\s*\^\s*\{?\s*[23]\s*\}?)?$"
)
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{(?P<content>[^{}]*)\}"
)
_AND_WORD = re.compile(r"\s+(?:and|or)\s+")
_INFINITY_WORD = re.compile(r"(?<![\\a-zA-Z])inf(?:inity)?(?![a-zA-Z])")
_SPACE = re.compile(r"(?P<command>\\[a-zA-Z]+)?\s+(?=(?P<letter>[a-zA-Z])?)")
_ZERO_DECIMALS = re.compile(r"(\d)\.0*(?!\d)")
_WHOLE_ANSWER_SPELLINGS = {"{}": "\\emptyset", "(-\\infty,\\infty)": "\\mathbb{R}"}


def normalize_answer(answer: str, spaced_thousands: bool = False) -> str:
    """Canonical form of one final answer (see the module docstring); `spaced_thousands`: "32, 349" is the
    number 32349 (see Conventions)."""
    text = answer.replace("\n", " ").strip().rstrip(".").strip().rstrip("\\").strip()
    text = _DOUBLED_BACKSLASH.sub(r"\\", text)
    text = _LATEX_THOUSANDS.sub(",", text)
    text = _SPACING.sub(_replace_spacing, text)
    if spaced_thousands:
        text = _SPACED_THOUSANDS.sub(lambda match: match.group().replace(", ", ""), text)
    text = _THOUSANDS.sub(lambda match: match.group().replace(",", ""), text)
    for ascii_relation, command in _ASCII_RELATIONS:
        text = text.replace(ascii_relation, command)
    text = _canonical_commands(text)
    text = text.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    text = _DEGREES.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    text = _strip_trailing_units(text)
    text = _TEXT_WRAPPER.sub(r"\g<content>", text)
    text = _AND_WORD.sub(",", text).replace(";", ",")
    text = _INFINITY_WORD.sub(r"\\infty", text)
    text = _SPACE.sub(_replace_space, text).strip()
    text = _ZERO_DECIMALS.sub(r"\1", text)
    return _WHOLE_ANSWER_SPELLINGS.get(text, text)


def _replace_spacing(match: re.Match[str]) -> str:
    """Thin spaces become spaces, ``\\!`` disappears (``10,\\!080``), ``\\\\`` row breaks stay."""
    token = match.group()
    if token == "\\\\":
        return token
    return "" if token == "\\!" else " "


def _canonical_commands(text: str) -> str:
    """One spelling per construct: \\frac, pmatrix, \\le/\\ge/\\ne, plain braces, no \\left/\\right."""
    text = _FRACTION_SPELLINGS.sub(r"\\frac", text)
    text = _MATRIX_BEGIN.sub(r"\\begin{pmatrix}", text)
    text = _MATRIX_END.sub(r"\\end{pmatrix}", text)
    text = _SIZED_DELIMITERS.sub("", text)
    text = _VARIANT_SPELLINGS.sub(lambda match: _CANONICAL_SPELLINGS[match.group("name")], text)
    text = text.replace("\\displaystyle", "")
    return text.replace("\\{", "{").replace("\\}", "}").replace("\\lbrace", "{").replace("\\rbrace", "}")


def _strip_trailing_units(text: str) -> str:
    """Drop a trailing ``\\text{...}`` (any content, as Qwen does) or a run of unit words
    (``5 cm``, ``864 square inches``) when a value remains before it."""
    text_unit = _TRAILING_TEXT_UNIT.match(text)
    if text_unit and text_unit.group("value").strip():
        text = text_unit.group("value").strip()
    unit_words = _TRAILING_UNIT_WORDS.match(text)
    if unit_words and all(word.lower() in UNIT_WORDS for word in unit_words.group("units").split()):
        text = unit_words.group("value").strip()
    return text


def _replace_space(match: re.Match[str]) -> str:
    """Remove a space, unless it ends a command before a letter (``\\pi r`` must not become ``\\pir``)."""
    command = match.group("command") or ""
    return command + " " if command and match.group("letter") else command
