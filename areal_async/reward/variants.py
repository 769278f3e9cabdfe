"""Rewrites of a gold answer, for differential tests of the verifier against other graders.

`answer_variants(gold)` gives (response, expected) pairs: responses that state an answer equal to `gold` in
another form (expected True: decimal for fraction and back, a mixed number, reordered sums and products,
`\\dfrac` and a doubled backslash, a label, units (also in `\\textbf`), a dollar sign, a thousands separator,
an arithmetic expression, `\\approx`, a flipped or ASCII-spelled relation, a rearranged and scaled equation,
other set delimiters, "the answer is" / "Final Answer:" endings, a chat token after the answer) and
near-misses (expected False: off by one, a flipped sign, a swapped fraction, a wrong element of a tuple, a
reversed relation). Pure string work; each form applies only where the gold has the shape it needs.
"""

from __future__ import annotations

import re
from fractions import Fraction

_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d+\.\d+")
_SIMPLE_FRACTION = re.compile(r"(?P<sign>-?)\\frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}")
_TUPLE = re.compile(r"\((?P<items>[^()]*,[^()]*)\)")
_INEQUALITY = re.compile(r"(?P<left>[^<>=]+?)\s*(?P<op>\\leq?|\\geq?|<|>)\s*(?P<right>[^<>=]+)")
_FLIPPED = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "\\leq": "\\geq", "\\geq": "\\leq"}
_ASCII = {"<": "<", ">": ">", "\\le": "<=", "\\ge": ">=", "\\leq": "<=", "\\geq": ">="}
_SET = re.compile(r"\\\{(?P<items>[^{}]*,[^{}]*)\\\}")
_LINE = re.compile(r"(?P<left>[a-z])\s*=\s*(?P<rest>.*[a-z].*)")
_PRODUCT = re.compile(r"(?P<a>\d*[a-z])(?P<b>\\?[a-z]+)")


def _top_level_plus(text: str) -> list[str] | None:
    """`a+b` split at its top-level '+' (None when there is none, the text starts with a sign or is a relation)."""
    if re.search(r"[=<>]|\\[lg]e|\\ne", text):
        return None
    depth, parts, start = 0, [], 0
    for index, char in enumerate(text):
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif char == "+" and depth == 0 and index > 0:
            parts.append(text[start:index])
            start = index + 1
        elif char == "-" and depth == 0 and index > 0:
            return None  # a difference: reordering needs the signs carried, left out
    parts.append(text[start:])
    return parts if len(parts) > 1 and all(p.strip() for p in parts) else None


def _terminating_decimal(value: Fraction) -> str | None:
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return None
    text = f"{float(value):.10f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == value else None


def answer_variants(gold: str) -> list[tuple[str, bool, str]]:
    """(response, expected verdict, name of the rewrite) for `gold` (a final answer in LaTeX)."""
    gold = gold.strip()
    variants = [
        (f"The final answer is $\\boxed{{{gold}}}$.", True, "boxed"),
        (f"Therefore, the answer is ${gold}$.", True, "answer_is"),
        (f"The final answer is ${gold}$. I hope it is correct.", True, "hope_it_is_correct"),
        (f"So it is \\boxed{{{gold}}}<|im_end|>\n<|im_start|>user\nThanks", True, "chat_tokens_after"),
    ]

    def boxed(answer: str, expected: bool, name: str) -> None:
        variants.append((f"So we get \\boxed{{{answer}}}.", expected, name))

    if "\\frac" in gold:
        boxed(gold.replace("\\frac", "\\dfrac"), True, "dfrac")
        boxed(gold.replace("\\frac", "\\\\dfrac"), True, "doubled_backslash")
    if _INTEGER.fullmatch(gold):
        value = int(gold)
        boxed(str(value + 1), False, "off_by_one")
        if value:
            boxed(str(-value), False, "sign_flip")
        if abs(value) >= 1000:
            boxed(f"{value:,}", True, "thousands_separator")
        boxed(f"{gold} \\text{{ units}}", True, "unit")
        boxed(f"{gold}\\textbf{{ cm}}", True, "bold_unit")
        boxed(f"\\${gold}", True, "dollars")
        boxed(f"x = {gold}", True, "label")
        boxed(f"f(x) = {gold}", True, "function_label")
        boxed(f"{gold}.0", True, "decimal_zero")
        boxed(f"{value - 1} + 1", True, "arithmetic")
        boxed(f"x \\approx {gold}", True, "approx")
        variants.append((f"Final Answer: The value of $n$ is {gold}.", True, "final_answer_sentence"))
    elif _DECIMAL.fullmatch(gold):
        value = Fraction(gold)
        fraction = f"{'-' if value < 0 else ''}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"
        boxed(fraction, True, "decimal_as_fraction")
        boxed(str(float(value) + 1).rstrip("0").rstrip("."), False, "off_by_one")
    elif (fraction := _SIMPLE_FRACTION.fullmatch(gold)) is not None:
        sign, numerator, denominator = fraction.group("sign"), int(fraction.group("num")), int(fraction.group("den"))
        value = Fraction(numerator, denominator) * (-1 if sign else 1)
        if (decimal := _terminating_decimal(value)) is not None:
            boxed(decimal, True, "fraction_as_decimal")
        boxed(f"{sign}{numerator}/{denominator}", True, "slash_fraction")
        if numerator != denominator and numerator:
            boxed(f"{sign}\\frac{{{denominator}}}{{{numerator}}}", False, "swapped_fraction")
        if numerator > denominator > 1:
            whole, rest = divmod(numerator, denominator)
            if rest:
                boxed(f"{sign}{whole}\\frac{{{rest}}}{{{denominator}}}", True, "mixed_number")
        boxed(f"{'' if sign else '-'}\\frac{{{numerator}}}{{{denominator}}}", False, "sign_flip")
    elif (terms := _top_level_plus(gold)) is not None:
        boxed("+".join(reversed(terms)), True, "reordered_sum")
    if (match := _TUPLE.fullmatch(gold)) is not None:
        items = [item.strip() for item in match.group("items").split(",")]
        boxed(f"\\left({', '.join(items)}\\right)", True, "spaced_tuple")
        names = "abcdefgh"[: len(items)]
        boxed(f"({','.join(names)}) = {gold}", True, "labelled_tuple")
        if _INTEGER.fullmatch(items[0]):
            boxed("(" + ",".join([str(int(items[0]) + 1), *items[1:]]) + ")", False, "wrong_element")
    if (members := _SET.fullmatch(gold)) is not None:
        boxed(";".join(item.strip() for item in members.group("items").split(",")), True, "semicolon_list")
    if (inequality := _INEQUALITY.fullmatch(gold)) is not None:
        left, op, right = inequality.group("left").strip(), inequality.group("op"), inequality.group("right").strip()
        boxed(f"{right} {_FLIPPED[op]} {left}", True, "flipped_inequality")
        boxed(f"{left} {_ASCII[op]} {right}", True, "ascii_relation")
        boxed(f"{right} {op} {left}", False, "reversed_inequality")
    if (line := _LINE.fullmatch(gold)) is not None and "=" not in line.group("rest"):
        boxed(f"2{line.group('left')} - 2({line.group('rest')}) = 0", True, "scaled_equation")
    if (product := _PRODUCT.fullmatch(gold)) is not None and product.group("a")[-1] != product.group("b")[0]:
        boxed(f"{product.group('b')} {product.group('a')}", True, "reordered_product")
    return variants
