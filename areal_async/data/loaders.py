"""Loaders that turn prompt files into :class:`PromptRecord` lists.

Three formats are supported:

* ``areal_prompts``: AReaL's released pair, a prompts JSONL (``query_id``, ``prompt``)
  plus an ``id2info.json`` object mapping ``query_id -> {"solutions": [...], ...}``.
* ``areal_jsonl``: AReaL's joined JSONL (``query_id``, ``prompt``, ``task``, ``solutions``).
* ``jsonl``: any JSONL with a problem text and an answer under configurable keys
  (DeepScaleR, MATH-500, AIME, AMC, GSM8K, ...).

Every loader validates each line and raises :class:`DatasetError` naming the file and
1-based line number; a missing file raises :class:`FileNotFoundError`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_async.data.records import DatasetError, PromptRecord

PathLike = str | os.PathLike[str]

VALID_TASKS = ("math", "stem", "code")
DEFAULT_TASK = "math"
DEFAULT_PROMPT_KEYS = ("prompt", "problem", "question")
DEFAULT_ANSWER_KEYS = ("answer", "solution", "solutions")
TEMPLATE_PLACEHOLDER = "{problem}"

_GSM8K_FINAL_LINE = re.compile(r"####\s*(?P<answer>\S.*)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class _Location:
    """Where a value was read from, used to build :class:`DatasetError` messages."""

    path: Path
    line: int | None
    subject: str = ""

    def error(self, reason: str) -> DatasetError:
        """Return a DatasetError for this location, prefixed with the subject if any."""
        return DatasetError(self.path, self.line, f"{self.subject}: {reason}" if self.subject else reason)


# ---------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------


def _existing_file(path: PathLike) -> Path:
    """Return ``path`` as a Path, raising FileNotFoundError naming it if it is not a file."""
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(errno.ENOENT, "prompt file not found", str(file_path))
    return file_path


def _iter_json_objects(path: Path) -> Iterator[tuple[_Location, dict[str, Any]]]:
    """Yield ``(location, object)`` for each non-blank line of a UTF-8 JSONL file."""
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            where = _Location(path, line_number)
            text = _decode_utf8(raw_line, where)
            if not text.strip():
                continue
            yield where, _parse_json_object(text, where)


def _decode_utf8(raw: bytes, where: _Location) -> str:
    """Decode ``raw`` as UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise where.error(f"not valid UTF-8: {exc}") from exc


def _parse_json_object(text: str, where: _Location) -> dict[str, Any]:
    """Parse ``text`` as one JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise where.error(f"malformed JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise where.error(f"expected a JSON object, got {_json_type_name(value)}")
    return value


def _read_json_object_file(path: Path) -> dict[str, Any]:
    """Read a whole file holding one JSON object (such as ``id2info.json``)."""
    text = _decode_utf8(path.read_bytes(), _Location(path, None))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, exc.lineno, f"malformed JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DatasetError(path, None, f"expected one JSON object, got {_json_type_name(value)}")
    return value


def _json_type_name(value: Any) -> str:
    """Name ``value``'s type as JSON calls it."""
    json_names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
                  float: "number", type(None): "null"}
    return json_names.get(type(value), type(value).__name__)


def _collect_records(
    path: Path, parse_line: Callable[[dict[str, Any], _Location], PromptRecord]
) -> list[PromptRecord]:
    """Parse every line of a JSONL file, rejecting duplicate ids and an empty result."""
    records: list[PromptRecord] = []
    first_line_of_id: dict[str, int | None] = {}
    for where, obj in _iter_json_objects(path):
        record = parse_line(obj, where)
        if record.query_id in first_line_of_id:
            raise where.error(
                f"duplicate query_id {record.query_id!r} "
                f"(first on line {first_line_of_id[record.query_id]}, again on line {where.line})"
            )
        first_line_of_id[record.query_id] = where.line
        records.append(record)
    if not records:
        raise DatasetError(path, None, "the file had no records (it is empty or holds only blank lines)")
    return records


# ---------------------------------------------------------------------------
# Field validation
# ---------------------------------------------------------------------------


def _required(obj: dict[str, Any], key: str, where: _Location) -> Any:
    """Return ``obj[key]``, raising a DatasetError naming the key if it is absent."""
    if key not in obj:
        raise where.error(f"missing key {key!r}")
    return obj[key]


def _first_present_key(obj: dict[str, Any], keys: tuple[str, ...], role: str, where: _Location) -> str:
    """Return the first of ``keys`` present in ``obj``."""
    for key in keys:
        if key in obj:
            return key
    raise where.error(f"missing {role} key: none of {', '.join(repr(k) for k in keys)} is present")


def _query_id(value: Any, key: str, where: _Location) -> str:
    """Validate an id (a non-empty string or an integer) and return it as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise where.error(f"key {key!r} must be a non-empty string or an integer, got {value!r}")


def _prompt_text(value: Any, key: str, where: _Location) -> str:
    """Validate a prompt or problem text: a non-blank string."""
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"key {key!r} must be a non-empty string, got {value!r}")
    return value


def _solution_list(value: Any, key: str, where: _Location) -> tuple[str, ...]:
    """Validate a non-empty list of strings and return it as a tuple."""
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise where.error(f"key {key!r} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _task(obj: dict[str, Any], where: _Location) -> str:
    """Return the record's ``task`` (default ``"math"``), which must be a known task."""
    task = obj.get("task", DEFAULT_TASK)
    if task not in VALID_TASKS:
        raise where.error(f"key 'task' must be one of {', '.join(map(repr, VALID_TASKS))}, got {task!r}")
    return task


def _answer_solutions(value: Any, key: str, where: _Location) -> tuple[str, ...]:
    """Turn a generic answer (string, number or list of strings) into gold solutions.

    Numbers keep their JSON spelling as Python prints it (AMC's ``27.0`` -> ``"27.0"``);
    GSM8K-style worked answers are reduced to the number after their final ``####``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, str):
        return (_final_answer(value),)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(_final_answer(item) for item in value)
    raise where.error(f"key {key!r} must be a string, a number or a non-empty list of strings, got {value!r}")


def _final_answer(answer: str) -> str:
    """Return the text after a final ``#### `` line (thousands commas removed), else ``answer``."""
    last_line = answer.rstrip().rpartition("\n")[2].strip()
    match = _GSM8K_FINAL_LINE.fullmatch(last_line)
    if match is None:
        return answer
    return _THOUSANDS_COMMA.sub("", match["answer"])


def _apply_template(template: str | None, problem: str) -> str:
    """Put ``problem`` in place of ``{problem}`` in ``template`` (no other braces are touched)."""
    return problem if template is None else template.replace(TEMPLATE_PLACEHOLDER, problem)


def _check_template(template: str | None) -> None:
    """Reject a template that is not a string containing ``{problem}``."""
    if template is not None and (not isinstance(template, str) or TEMPLATE_PLACEHOLDER not in template):
        raise ValueError(f"template must be a string containing {TEMPLATE_PLACEHOLDER!r}, got {template!r}")


# ---------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------


def load_areal_jsonl(path: PathLike) -> list[PromptRecord]:
    """Load AReaL's joined JSONL format.

    Each line is an object with ``query_id`` (string or integer), ``prompt`` (string),
    ``solutions`` (non-empty list of strings) and optionally ``task`` (``"math"``,
    ``"stem"`` or ``"code"``; default ``"math"``).
    """

    def parse_line(obj: dict[str, Any], where: _Location) -> PromptRecord:
        return PromptRecord(
            query_id=_query_id(_required(obj, "query_id", where), "query_id", where),
            prompt=_prompt_text(_required(obj, "prompt", where), "prompt", where),
            solutions=_solution_list(_required(obj, "solutions", where), "solutions", where),
            task=_task(obj, where),
        )

    return _collect_records(_existing_file(path), parse_line)


def load_areal_prompts(prompts_path: PathLike, id2info_path: PathLike) -> list[PromptRecord]:
    """Load AReaL's released pair: a prompts JSONL plus an ``id2info.json``.

    Each prompts line has ``query_id`` and ``prompt`` (and optionally ``task``); ``id2info.json``
    is one object mapping each ``query_id`` to an object whose ``solutions`` is a non-empty
    list of strings. A prompt whose id is absent from ``id2info`` is an error.
    """
    prompts_file = _existing_file(prompts_path)
    id2info_file = _existing_file(id2info_path)
    id2info = _read_json_object_file(id2info_file)

    def parse_line(obj: dict[str, Any], where: _Location) -> PromptRecord:
        query_id = _query_id(_required(obj, "query_id", where), "query_id", where)
        if query_id not in id2info:
            raise where.error(f"query_id {query_id!r} not found in {id2info_file}")
        return PromptRecord(
            query_id=query_id,
            prompt=_prompt_text(_required(obj, "prompt", where), "prompt", where),
            solutions=_id2info_solutions(id2info[query_id], _Location(id2info_file, None, f"entry {query_id!r}")),
            task=_task(obj, where),
        )

    return _collect_records(prompts_file, parse_line)


def _id2info_solutions(info: Any, where: _Location) -> tuple[str, ...]:
    """Return the validated ``solutions`` of one ``id2info.json`` entry."""
    if not isinstance(info, dict):
        raise where.error(f"expected a JSON object, got {_json_type_name(info)}")
    return _solution_list(_required(info, "solutions", where), "solutions", where)


def load_jsonl(
    path: PathLike,
    prompt_keys: tuple[str, ...] = DEFAULT_PROMPT_KEYS,
    answer_keys: tuple[str, ...] = DEFAULT_ANSWER_KEYS,
    id_key: str | None = None,
    template: str | None = None,
) -> list[PromptRecord]:
    """Load a generic problem/answer JSONL file.

    Args:
        path: The JSONL file.
        prompt_keys: Candidate keys for the problem text; the first present one is used.
        answer_keys: Candidate keys for the gold answer; the first present one is used. The
            answer may be a string, a number (kept as Python prints it, e.g. ``"27.0"``) or a
            list of strings; a string whose last line is ``#### <number>`` (GSM8K) becomes
            that number with thousands commas removed.
        id_key: Key holding the record id (string or integer); if None the id is
            ``"<file stem>-<line number>"``.
        template: Optional string containing ``{problem}``, which is replaced by the problem
            text, e.g. ``"{problem} Let's think step by step and output the final answer
            within \\boxed{}."``. Other braces are left as they are.

    Every record gets ``task="math"``.
    """
    _check_template(template)
    file_path = _existing_file(path)

    def parse_line(obj: dict[str, Any], where: _Location) -> PromptRecord:
        prompt_key = _first_present_key(obj, prompt_keys, "prompt", where)
        answer_key = _first_present_key(obj, answer_keys, "answer", where)
        if id_key is None:
            query_id = f"{file_path.stem}-{where.line}"
        else:
            query_id = _query_id(_required(obj, id_key, where), id_key, where)
        return PromptRecord(
            query_id=query_id,
            prompt=_apply_template(template, _prompt_text(obj[prompt_key], prompt_key, where)),
            solutions=_answer_solutions(obj[answer_key], answer_key, where),
        )

    return _collect_records(file_path, parse_line)


CODE_ID_KEYS = ("task_id", "id", "query_id", "problem_id")
CODE_PROBLEM_KEYS = ("question", "problem", "prompt", "text")


def code_prompt(obj: dict[str, Any]) -> str | None:
    """The text a model is given for a code problem: HumanEval's function to complete, MBPP's description with
    its first assertion (which names the function and its arguments, as the MBPP paper prompts), or the problem
    text of an `input_output` problem (its `fn_name` named); None when the object has none."""
    if "entry_point" in obj and isinstance(obj.get("prompt"), str):
        return ("Complete the following Python function. Answer with the whole function in a ```python block.\n\n"
                f"```python\n{obj['prompt']}```")
    text = next((obj[key] for key in CODE_PROBLEM_KEYS if isinstance(obj.get(key), str) and obj[key].strip()), None)
    if text is None:
        return None
    if isinstance(obj.get("test_list"), list) and obj["test_list"]:
        return f"{text}\nYour code should pass this test:\n{obj['test_list'][0]}\nAnswer in a ```python block."
    return f"{text}\nAnswer with a Python program in a ```python block."


def load_code_jsonl(path: PathLike) -> list[PromptRecord]:
    """Load code problems: HumanEval lines (`task_id`, `prompt`, `entry_point`, `test`), MBPP lines (`task_id`,
    `prompt` or `text`, `test_list`, optional `test_imports` and `code`) or AReaL's code lines (`query_id`,
    `question` or `prompt`, `input_output`, as JSON text or an object). Each becomes a record of task "code" whose
    one solution is its tests (`encoded_tests`): the code verifier runs them (reward.kind=code)."""
    from areal_async.reward.code_verifier import encoded_tests

    def parse_line(obj: dict[str, Any], where: _Location) -> PromptRecord:
        id_key = _first_present_key(obj, CODE_ID_KEYS, "id", where)
        prompt = code_prompt(obj)
        if prompt is None:
            raise where.error(f"missing the problem: none of 'prompt' with 'entry_point', "
                              f"{', '.join(repr(k) for k in CODE_PROBLEM_KEYS)} is a non-empty string")
        try:
            spec = encoded_tests(obj)
        except ValueError as error:
            raise where.error(str(error)) from None
        return PromptRecord(query_id=_query_id(obj[id_key], id_key, where), prompt=prompt, solutions=(spec,),
                            task="code")

    return _collect_records(_existing_file(path), parse_line)


PROMPT_LOADERS: dict[str, Callable[..., list[PromptRecord]]] = {
    "areal_prompts": load_areal_prompts,
    "areal_jsonl": load_areal_jsonl,
    "jsonl": load_jsonl,
    "code_jsonl": load_code_jsonl,
}


def load_prompts(kind: str, **kwargs: Any) -> list[PromptRecord]:
    """Load prompts with the loader named by ``kind``, passing ``kwargs`` through.

    ``kind`` is one of ``"areal_prompts"`` (:func:`load_areal_prompts`), ``"areal_jsonl"``
    (:func:`load_areal_jsonl`) or ``"jsonl"`` (:func:`load_jsonl`).
    """
    if kind not in PROMPT_LOADERS:
        valid = ", ".join(repr(name) for name in PROMPT_LOADERS)
        raise ValueError(f"unknown prompt file kind {kind!r}; valid kinds are {valid}")
    return PROMPT_LOADERS[kind](**kwargs)
