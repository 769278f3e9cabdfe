"""A small, safe parser from LaTeX / plain-text math to sympy expressions.

Model output is untrusted, so nothing here evaluates text as Python (no ``eval``, ``sympify``,
``parse_expr`` or ``parse_latex``): a recursive-descent parser over a whitelisted subset builds
sympy objects directly. Safety bounds: input length, nesting depth, and the size of powers.

Grammar (juxtaposition multiplies; ``\\frac12`` and ``\\sqrt2`` take one TeX token, while a plain
``2^10`` means ``2^{10}`` because that is what people who type it mean)::

    expression := term (("+" | "-") term)*
    term       := signed (("*" | "/" | \\cdot | \\times | \\div) signed | power)*
    signed     := ("+" | "-") signed | power
    power      := primary ("^" signed)?
    primary    := number | symbol | "(" expression ")" | "{" expression "}" | "[" expression "]"
                | "|" expression "|" | \\frac arg arg | \\sqrt ["[" expression "]"] arg
                | function ["^" arg] ["_" arg] (group | power) | \\pi | \\infty | e | i
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

import sympy

MAX_INPUT_CHARS = 1000
MAX_NESTING_DEPTH = 100  # recursion levels; a parenthesis costs two
MAX_POWER_DIGITS = 1000  # refuse numeric powers whose value would have more digits than this
MAX_SYMBOLIC_EXPONENT = 1000  # refuse x^n with |n| above this: expanding it would never finish

GREEK_LETTERS = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
    "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()
)
FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "log": sympy.log, "ln": sympy.log,
    "exp": sympy.exp,
}  # fmt: skip
_INVERSE_TRIG = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}  # \sin^{-1} x
CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
FRACTION_COMMANDS = frozenset({"frac", "dfrac", "tfrac", "cfrac"})
_OPERATOR_COMMANDS = frozenset({"cdot", "times", "ast", "div"})
_KNOWN_COMMANDS = sorted(
    {*FUNCTIONS, *GREEK_LETTERS, *CONSTANTS, *FRACTION_COMMANDS, *_OPERATOR_COMMANDS, "sqrt"}, key=len, reverse=True
)
# Names recognised without a backslash at the end of a run of letters ("2pi", "sqrt(2)").
_PLAIN_WORDS = sorted([*FUNCTIONS, "sqrt", "pi"], key=len, reverse=True)
_UNICODE_REPLACEMENTS = {
    "π": "\\pi ", "∞": "\\infty ", "√": "\\sqrt", "·": "*", "⋅": "*", "×": "*", "÷": "/", "−": "-",
}  # fmt: skip
_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>\d+(?:\.\d*)?|\.\d+)"
    r"|\\(?P<command>[a-zA-Z]+|.)"
    r"|(?P<letters>[a-zA-Z]+)"
    r"|(?P<double_star>\*\*)"
    r"|(?P<op>[-+*/^_(){}\[\]|,=&!<>:;'])",
    re.DOTALL,
)
_MULTIPLY = frozenset({("op", "*"), *(("command", name) for name in _OPERATOR_COMMANDS - {"div"})})
_DIVIDE = frozenset({("op", "/"), ("command", "div")})
_GROUP_CLOSERS = {"(": ")", "{": "}", "[": "]"}

Token = tuple[str, str]  # (kind, text): kind is number, letter, word, command or op


class ParseError(ValueError):
    """The text is outside the supported math subset or exceeds a safety bound."""


def parse_math(text: str) -> sympy.Expr:
    """Parse LaTeX or plain-text math into a sympy expression; raise ParseError if unsupported."""
    if len(text) > MAX_INPUT_CHARS:
        raise ParseError(f"expression longer than {MAX_INPUT_CHARS} characters")
    try:
        return _Parser(_tokenize(text)).parse()
    except ParseError:
        raise
    except (ArithmeticError, TypeError, ValueError, RecursionError) as error:  # sympy refusing a construction
        raise ParseError(f"cannot build the expression: {error}") from error


def _tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens; raise ParseError on a character outside the subset."""
    for unicode_char, latex in _UNICODE_REPLACEMENTS.items():
        text = text.replace(unicode_char, latex)
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ParseError(f"unsupported character {text[position]!r}")
        position = match.end()
        kind = match.lastgroup
        if kind == "letters":
            tokens.extend(_split_letters(match.group()))
        elif kind == "command":
            tokens.extend(_split_command(match.group(kind)))
        elif kind == "double_star":
            tokens.append(("op", "^"))
        elif kind != "space":
            tokens.append((kind, match.group(kind)))
    return tokens


def _split_letters(run: str) -> list[Token]:
    """Single-letter symbols, except that a run may end in a plain function word ("xsqrt")."""
    for word in _PLAIN_WORDS:
        if run.endswith(word):
            return [("letter", letter) for letter in run[: -len(word)]] + [("word", word)]
    return [("letter", letter) for letter in run]


def _split_command(name: str) -> list[Token]:
    """A command, or a known command run into letters by lost spacing (``\\cotx`` -> ``\\cot x``)."""
    if name not in _KNOWN_COMMANDS:
        for known in _KNOWN_COMMANDS:
            if name.startswith(known):
                return [("command", known), *_split_letters(name[len(known) :])]
    return [("command", name)]


def _exact_number(text: str) -> sympy.Rational:
    """A decimal literal as an exact rational, so 0.5 and \\frac12 are the same object."""
    value = Fraction(text)
    return sympy.Rational(value.numerator, value.denominator)


def _log10_magnitude(value: sympy.Expr) -> float | None:
    """log10 of |value| for a numeric expression; None for zero or when it cannot be estimated."""
    try:
        magnitude = sympy.Abs(value).evalf(15)  # sympy Floats carry arbitrarily large exponents
        if not isinstance(magnitude, sympy.Float) or magnitude == 0:
            return None
        return float(sympy.log(magnitude)) / math.log(10)
    except (TypeError, ValueError, ArithmeticError):
        return None


def _checked_power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """``base ** exponent``, refusing results too large to compute (e.g. 9^{9^9})."""
    exponent_log = _log10_magnitude(exponent) if exponent.is_number else None
    if exponent_log is not None:
        if base.is_number:
            base_log = _log10_magnitude(base)
            # the result has about |exponent| * |log10 base| digits
            if base_log and exponent_log + math.log10(abs(base_log)) > math.log10(MAX_POWER_DIGITS):
                raise ParseError("power too large")
        elif exponent_log > math.log10(MAX_SYMBOLIC_EXPONENT):
            raise ParseError("exponent too large")
    return sympy.Pow(base, exponent)


def _root(radicand: sympy.Expr, index: sympy.Expr) -> sympy.Expr:
    """The ``index``-th root; the real one for a negative number under an odd integer index."""
    if index == 0:
        raise ParseError("zeroth root")
    if index.is_integer and index.is_odd and radicand.is_number and radicand.is_negative:
        return -_checked_power(-radicand, 1 / index)
    return _checked_power(radicand, 1 / index)


class _Parser:
    """Recursive-descent parser over a token list (see the module docstring for the grammar)."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens
        self._position = 0
        self._depth = 0

    def parse(self) -> sympy.Expr:
        """Parse the whole token list as one expression."""
        value = self._expression()
        if self._peek() is not None:
            raise ParseError(f"unexpected {self._peek()[1]!r}")
        return value

    # -- token access ---------------------------------------------------------------------------

    def _peek(self) -> Token | None:
        return self._tokens[self._position] if self._position < len(self._tokens) else None

    def _advance(self) -> Token:
        token = self._peek()
        if token is None:
            raise ParseError("unexpected end of expression")
        self._position += 1
        return token

    def _accept(self, token: Token) -> bool:
        """Consume the next token if it equals ``token``."""
        if self._peek() == token:
            self._position += 1
            return True
        return False

    def _expect(self, token: Token) -> None:
        if not self._accept(token):
            raise ParseError(f"expected {token[1]!r}")

    @contextmanager
    def _nested(self) -> Iterator[None]:
        """Count one level of recursion; deep nesting is refused before Python's stack runs out."""
        self._depth += 1
        if self._depth > MAX_NESTING_DEPTH:
            raise ParseError("expression nested too deeply")
        try:
            yield
        finally:
            self._depth -= 1

    # -- grammar --------------------------------------------------------------------------------

    def _expression(self) -> sympy.Expr:
        with self._nested():
            value = self._term()
            while (token := self._peek()) in (("op", "+"), ("op", "-")):
                self._advance()
                right = self._term()
                value = value + right if token[1] == "+" else value - right
            return value

    def _term(self) -> sympy.Expr:
        value = self._signed()
        while (token := self._peek()) is not None:
            if token in _MULTIPLY:
                self._advance()
                value = value * self._signed()
            elif token in _DIVIDE:
                self._advance()
                value = value / self._signed()
            elif _starts_factor(token):
                value = value * self._power()
            else:
                break
        return value

    def _signed(self) -> sympy.Expr:
        with self._nested():
            if self._accept(("op", "+")):
                return self._signed()
            if self._accept(("op", "-")):
                return -self._signed()
            return self._power()

    def _power(self) -> sympy.Expr:
        base = self._primary()
        if self._accept(("op", "^")):
            return _checked_power(base, self._signed())
        return base

    def _primary(self) -> sympy.Expr:
        kind, text = self._advance()
        if kind == "number":
            return _exact_number(text)
        if kind == "letter":
            return self._symbol(text)
        if kind in ("word", "command"):
            return self._named(text)
        if text in _GROUP_CLOSERS:
            value = self._expression()
            self._expect(("op", _GROUP_CLOSERS[text]))
            return value
        if text == "|":
            value = self._expression()
            self._expect(("op", "|"))
            return sympy.Abs(value)
        raise ParseError(f"unexpected {text!r}")

    def _argument(self) -> sympy.Expr:
        """A TeX macro argument: a group, or a single token (one digit of a longer number)."""
        token = self._peek()
        if token is not None and token[0] == "number" and len(token[1]) > 1:
            if token[1][0] == ".":
                raise ParseError("a decimal point cannot start a macro argument")
            self._tokens[self._position] = ("number", token[1][1:])
            return sympy.Integer(int(token[1][0]))
        return self._primary()

    def _symbol(self, name: str) -> sympy.Expr:
        """A variable, with an optional subscript (x_1, a_{n}); bare e and i are the constants."""
        if self._accept(("op", "_")):
            return sympy.Symbol(f"{name}_{self._subscript()}")
        if name == "e":
            return sympy.E
        if name == "i":
            return sympy.I
        return sympy.Symbol(name)

    def _subscript(self) -> str:
        """The text of a subscript made of letters and digits: one token or a braced run."""
        braced = self._accept(("op", "{"))
        parts = []
        while (token := self._peek()) is not None and token[0] in ("number", "letter"):
            parts.append(self._advance()[1])
            if not braced:
                break
        if braced:
            self._expect(("op", "}"))
        if not parts:
            raise ParseError("empty subscript")
        return "".join(parts)

    def _named(self, name: str) -> sympy.Expr:
        """A command or plain word: fraction, root, constant, Greek letter or function."""
        if name in FRACTION_COMMANDS:
            numerator = self._argument()
            return numerator / self._argument()
        if name == "sqrt":
            if self._accept(("op", "[")):
                index = self._expression()
                self._expect(("op", "]"))
                return _root(self._argument(), index)
            return _root(self._argument(), sympy.Integer(2))
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in GREEK_LETTERS:
            return self._symbol(name)
        if name in FUNCTIONS:
            return self._function(name)
        raise ParseError(f"unsupported command {name!r}")

    def _function(self, name: str) -> sympy.Expr:
        """``\\sin x``, ``\\sin^2(x)``, ``\\sin^{-1} x``, ``\\log_2 8``, ``\\ln(x)``."""
        function_power = log_base = None
        if self._accept(("op", "^")):
            function_power = self._argument()
        if name == "log" and self._accept(("op", "_")):
            log_base = self._argument()
        if self._peek() in (("op", "("), ("op", "{"), ("op", "[")):
            argument = self._primary()
        else:
            argument = self._power()
        if function_power == -1 and name in _INVERSE_TRIG:
            return _INVERSE_TRIG[name](argument)
        value = FUNCTIONS[name](argument) if log_base is None else sympy.log(argument, log_base)
        return value if function_power is None else _checked_power(value, function_power)


def _starts_factor(token: Token) -> bool:
    """Whether ``token`` can begin an implicitly multiplied factor (as in 2x, 3\\sqrt2, (a)(b))."""
    kind, text = token
    if kind in ("number", "letter", "word"):
        return True
    if kind == "command":
        return text in FRACTION_COMMANDS or text == "sqrt" or text in CONSTANTS or text in GREEK_LETTERS or (
            text in FUNCTIONS
        )
    return text in _GROUP_CLOSERS
