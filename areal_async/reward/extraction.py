"""Pull the final answer out of a model response.

The response ends at its first end-of-turn token (``<|im_end|>``, ``<|im_start|>``, ``<|endoftext|>``,
``<|eot_id|>``, DeepSeek's ``<｜end▁of▁sentence｜>``): what a model writes after it is not its answer.
Strategies, tried in this order by ``mode="auto"``:

* ``boxed``: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed),
  or the token after ``\\boxed `` when no brace follows;
* ``answer_is``: the text after the last "the answer is" / "final answer is", up to the end of
  that sentence or line, with ``$`` removed;
* ``final_answer``: the sentence after the last "Final Answer:", or what follows its last " is "
  ("Final Answer: The largest $n$ is 34." gives ``34``);
* ``latex``: the last inline math expression (``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``),
  or what follows its last ``=`` (``$2 + 3 = 5$`` gives ``5``);
* ``last_number``: the last number (integer, decimal, fraction ``3/4``, thousands commas dropped).

``mode="answer_tag"`` (Open-Reasoner-Zero's prompt, which asks for ``<answer> ... </answer>``) is not part of
"auto": it takes the content of the last closed ``<answer>...</answer>``, the last ``\\boxed{}`` in it if there is
one, else all of it; a response without a closed tag is read as "auto" reads it (evaluation's ``judged_text``).

Every scan is linear in the length of the text, so hostile responses cannot make it slow.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from areal_async.config import ExtractMode

EXTRACT_MODES = tuple(mode.value for mode in ExtractMode)

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_OPENING_BRACE = re.compile(r"\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_UNBRACED_BOX_ARGUMENT = re.compile(r"[ \t]*([^\s${}]+)")
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)
_FINAL_ANSWER = re.compile(r"\bfinal\s+answer\s*:", re.IGNORECASE)
_LAST_IS = re.compile(r".*\sis\s", re.DOTALL)
_END_OF_TURN = re.compile(r"<\|(?:im_end|im_start|endoftext|eot_id|end_of_text)\|>|<｜end▁of▁sentence｜>")
_MATH_OPENER = re.compile(r"\$\$|\\\[|\\\(|(?<!\\)\$")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_MATH_CLOSERS = {"$$": "$$", "\\[": "\\]", "\\(": "\\)"}
# Text caught between two dollar amounts ("pays $5 and then $10", "$400 + $60"), not math:
# two plain words in a row, or a dangling operator at the end.
_NOT_MATH = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}\s+[a-zA-Z]{2,}|[-+*/=<>^_,\u2013\u2212]$")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(
    r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"  # 12, 1,234.5, 3/4
    r"|(?<![\d.])-?\.\d+"  # .5
)


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """Return the final answer written in ``text``, or None if the strategy finds nothing.

    ``mode`` is ``"auto"`` (try every strategy in the order of the module docstring), the name
    of one strategy to use alone: ``"boxed"``, ``"answer_is"``, ``"final_answer"``, ``"latex"``,
    ``"last_number"``, or ``"answer_tag"`` (the module docstring).
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract mode {mode!r} is not one of {EXTRACT_MODES}")
    if (end := _END_OF_TURN.search(text)) is not None:
        text = text[: end.start()]
    if mode == "answer_tag":
        tagged = _ANSWER_TAG.findall(text)
        if tagged:
            content = tagged[-1].strip()
            return _extract_boxed(content) or content or None
        mode = "auto"
    strategies = _STRATEGIES if mode == "auto" else {mode: _STRATEGIES[mode]}
    for strategy in strategies.values():
        answer = strategy(text)
        if answer:
            return answer
    return None


def _balanced_group(text: str, open_index: int) -> str | None:
    """Content of the ``{...}`` group whose ``{`` is at ``open_index``; None if it never closes.

    Escaped characters (``\\{``, ``\\}``) do not count as group delimiters.
    """
    depth = 0
    for match in _BRACE_OR_ESCAPE.finditer(text, open_index):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : match.start()]
    return None


def _extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed``/``\\fbox`` command (only the last one is looked at)."""
    last_box = None
    for last_box in _BOX_COMMAND.finditer(text):
        pass
    if last_box is None:
        return None
    after = last_box.end()
    brace = _OPENING_BRACE.match(text, after)
    if brace:
        content = _balanced_group(text, brace.end() - 1)
    else:
        token = _UNBRACED_BOX_ARGUMENT.match(text, after)
        content = token.group(1) if token else None
    return content.strip() if content is not None else None


def _sentence_end(text: str, start: int) -> int:
    """Index where the sentence starting at ``start`` ends: a newline, or a period that is
    followed by whitespace or the end of the text and is not inside ``$...$``."""
    in_math = False
    for index in range(start, len(text)):
        char = text[index]
        if char == "\n":
            return index
        if char == "$" and (index == 0 or text[index - 1] != "\\"):
            in_math = not in_math
        elif char == "." and not in_math and (index + 1 == len(text) or text[index + 1].isspace()):
            return index
    return len(text)


def _sentence_after_last(phrase: re.Pattern, text: str) -> str | None:
    """The rest of the sentence after the last match of ``phrase``; None without a match."""
    last = None
    for last in phrase.finditer(text):
        pass
    return None if last is None else text[last.end() : _sentence_end(text, last.end())]


def _bare(text: str) -> str:
    """Without math dollars (an escaped ``\\$`` stays) or bold marks."""
    return _UNESCAPED_DOLLAR.sub("", text).strip().strip("*").strip()


def _extract_answer_is(text: str) -> str | None:
    """Text after the last "answer is" up to the end of its sentence, without ``$`` or bold marks."""
    sentence = _sentence_after_last(_ANSWER_IS, text)
    return None if sentence is None else _bare(sentence)


def _extract_final_answer(text: str) -> str | None:
    """The sentence after the last "Final Answer:", from its last " is " on if it has one."""
    sentence = _sentence_after_last(_FINAL_ANSWER, text)
    if sentence is None:
        return None
    if (is_ := _LAST_IS.match(sentence)) is not None:
        sentence = sentence[is_.end() :]
    return _bare(sentence)


def _extract_latex(text: str) -> str | None:
    """The last inline math expression that is not prose, or the right-hand side of its last
    ``=``; an unclosed delimiter ends the scan."""
    last_content = None
    position = 0
    while (opener := _MATH_OPENER.search(text, position)) is not None:
        if opener.group() == "$":
            closer = _UNESCAPED_DOLLAR.search(text, opener.end())
            close_start, close_end = (closer.start(), closer.end()) if closer else (-1, -1)
        else:
            closing = _MATH_CLOSERS[opener.group()]
            close_start = text.find(closing, opener.end())
            close_end = close_start + len(closing)
        if close_start < 0:
            break
        content = text[opener.end() : close_start].strip()
        closes_before_amount = text[close_end : close_end + 1].isdigit()  # "... $10": a price
        if content and not closes_before_amount and not _NOT_MATH.search(content):
            last_content = content
        position = close_end
    if last_content is None:
        return None
    return last_content.rsplit("=", 1)[-1].strip()  # "2 + 3 = 5" ends in its value


def _extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands commas removed.

    A ``-`` directly after a letter, digit or closing bracket is subtraction, not a sign.
    """
    last_number = None
    for last_number in _NUMBER.finditer(text):
        pass
    if last_number is None:
        return None
    number = last_number.group().replace(",", "")
    start = last_number.start()
    if number.startswith("-") and start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]}"):
        number = number[1:]
    return number


_STRATEGIES: dict[str, Callable[[str], str | None]] = {
    "boxed": _extract_boxed,
    "answer_is": _extract_answer_is,
    "final_answer": _extract_final_answer,
    "latex": _extract_latex,
    "last_number": _extract_last_number,
}
