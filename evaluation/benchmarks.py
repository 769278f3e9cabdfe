"""Benchmark files: a registry of the known benchmarks, the JSONL loader, and the synthetic benchmark writer.

A benchmark is a JSONL file with one problem per line. Which field holds the problem, which the gold answer
and which the id is set per benchmark (:class:`BenchmarkSpec`), as is how the gold answer is read
(``answer_format``: ``plain``, or ``after_hashes`` for GSM8K's worked solutions ending in ``#### 42``).

The repository holds no copies of the public benchmark files: they are read from a data directory
(``--data-dir``, else ``$AREAL_EVAL_DATA``, else ``../shared/data/eval`` next to the repository).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "AREAL_EVAL_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONVENIENCE_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "eval"
ANSWER_FORMATS = ("plain", "after_hashes", "code_tests")
PUBLIC_SOURCES = (
    "MATH-500: openai/prm800k (prm800k/math_splits/test.jsonl; the same file is inclusionAI/AReaL "
    "evaluation/data/math_500/test.jsonl); AIME 2024 and AMC 2023: QwenLM/Qwen2.5-Math evaluation/data/"
    "{aime24,amc23}/test.jsonl; GSM8K: openai/grade-school-math grade_school_math/data/test.jsonl"
)

_HASHES_LINE = re.compile(r"####\s*(\S.*)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class BenchmarkFormatError(ValueError):
    """A benchmark file's content is invalid. The message starts with ``<file>:<line>:`` (1-based line)."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}" if line is not None else f"{self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.reason))


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark file.

    Attributes:
        name: Short name used in file names and tables' keys (``math_500``).
        file: File name inside the data directory, or a path (absolute, or relative to the working directory).
        problem_field: Key of the problem text.
        answer_field: Key of the gold answer (a string, a number, or a list of strings = several golds).
        id_field: Key of the problem id (string or integer); None numbers problems by line (``<name>-<line>``).
        answer_format: ``plain`` (the value as is, numbers as Python prints them) or ``after_hashes`` (the text
            after the last ``####`` of the answer, thousands commas removed: GSM8K).
        display_name: Column header in the Markdown table.
        limit: Keep only the first `limit` problems (None: all).
    """

    name: str
    file: str
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    answer_format: str = "plain"
    display_name: str = ""
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"benchmark {self.name}: limit must be a positive integer, got {self.limit!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"benchmark {self.name}: answer_format must be one of {ANSWER_FORMATS}, "
                             f"got {self.answer_format!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"benchmark name {self.name!r} may only use letters, digits, '_', '.', '-'")

    @property
    def title(self) -> str:
        return self.display_name or self.name

    @property
    def task(self) -> str:
        """Which verifier judges it: "code" (its tests) or "math" (its gold answers)."""
        return "code" if self.answer_format == "code_tests" else "math"


KNOWN_BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("math_500", "math500.jsonl", id_field="unique_id", display_name="MATH-500"),
        BenchmarkSpec("aime24", "aime24.jsonl", id_field="id", display_name="AIME 2024"),
        BenchmarkSpec("amc23", "amc23.jsonl", id_field="id", display_name="AMC 2023"),
        BenchmarkSpec("gsm8k", "gsm8k_test.jsonl", problem_field="question", answer_format="after_hashes",
                      display_name="GSM8K"),
        BenchmarkSpec("synthetic", "synthetic.jsonl", id_field="id", display_name="Synthetic"),
        # code: in the data directory, or in the `code` folder beside it (../shared/data/code)
        BenchmarkSpec("humaneval", "humaneval.jsonl", id_field="task_id", answer_format="code_tests",
                      display_name="HumanEval"),
        BenchmarkSpec("mbpp", "mbpp_sanitized.jsonl", id_field="task_id", answer_format="code_tests",
                      display_name="MBPP"),
    )
}
_SPEC_OPTIONS = {"problem": "problem_field", "answer": "answer_field", "id": "id_field",
                 "format": "answer_format", "title": "display_name", "limit": "limit"}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: `index` is its 0-based position in the file's problem order."""

    problem_id: str
    index: int
    line: int
    text: str
    golds: tuple[str, ...]


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its spec, the file it was read from, the file's SHA-256 and its problems."""

    spec: BenchmarkSpec
    path: Path
    sha256: str
    problems: tuple[Problem, ...]

    @property
    def name(self) -> str:
        return self.spec.name


def default_data_dir() -> Path | None:
    """``$AREAL_EVAL_DATA`` if set, else ``../shared/data/eval`` next to the repository if it exists, else None."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return CONVENIENCE_DATA_DIR if CONVENIENCE_DATA_DIR.is_dir() else None


def parse_benchmark_arg(text: str) -> tuple[BenchmarkSpec, bool]:
    """A benchmark named on the command line -> (spec, whether its file is an explicit path).

    Forms: ``gsm8k`` (a known benchmark, its file in the data directory); ``name=path.jsonl`` (that file;
    a known name keeps its fields, another name defaults to ``problem``/``answer``); either followed by
    comma-separated options ``,problem=F``, ``,answer=F``, ``,id=F``, ``,format=plain|after_hashes|code_tests``,
    ``,title=T``, ``,limit=N`` (first N problems), e.g. ``mybench=/data/x.jsonl,problem=question,answer=final``
    or ``gsm8k,limit=20``.
    """
    head, *option_items = _split_options(text)
    name, has_path, path = head.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"benchmark {text!r}: empty name")
    if name in KNOWN_BENCHMARKS:
        spec = KNOWN_BENCHMARKS[name]
    elif has_path:
        spec = BenchmarkSpec(name, path)
    else:
        raise ValueError(f"unknown benchmark {name!r}: known ones are {sorted(KNOWN_BENCHMARKS)}, or give a file "
                         f"as {name}=path.jsonl")
    if has_path:
        if not path:
            raise ValueError(f"benchmark {text!r}: empty path after '='")
        spec = replace(spec, file=path)
    for item in option_items:
        key, _, value = item.partition("=")
        if key == "limit":
            if not value.isdigit():
                raise ValueError(f"benchmark {text!r}: limit must be a positive integer, got {value!r}")
            spec = replace(spec, limit=int(value))
        else:
            spec = replace(spec, **{_SPEC_OPTIONS[key]: value or None})
    return spec, bool(has_path)


def _split_options(text: str) -> list[str]:
    """Splits ``head,key=value,...`` at commas that start a known option (paths may contain other commas)."""
    pieces = text.split(",")
    parts = [pieces[0]]
    for piece in pieces[1:]:
        if piece.partition("=")[0] in _SPEC_OPTIONS and "=" in piece:
            parts.append(piece)
        else:
            parts[-1] += "," + piece
    return parts


def resolve_benchmark_path(spec: BenchmarkSpec, explicit: bool, data_dir: str | os.PathLike | None) -> Path:
    """The file of `spec`: an explicit path as given, else `spec.file` inside `data_dir` (error if unknown)."""
    if explicit or Path(spec.file).is_absolute():
        path = Path(spec.file)
        if not path.is_file():
            raise FileNotFoundError(f"benchmark {spec.name}: file {path} not found")
        return path
    if data_dir is None:
        raise FileNotFoundError(
            f"benchmark {spec.name}: no data directory; pass --data-dir or set ${DATA_DIR_ENV} to the folder holding "
            f"{spec.file}. The public files come from: {PUBLIC_SOURCES} (see docs/evaluation.md)"
        )
    path = Path(data_dir) / spec.file
    if not path.is_file() and spec.task == "code" and (Path(data_dir).parent / "code" / spec.file).is_file():
        path = Path(data_dir).parent / "code" / spec.file
    if not path.is_file():
        hint = (" Write one with `areal-async eval --write-synthetic 200 PATH` and pass synthetic=PATH."
                if spec.name == "synthetic" else f" The public files come from: {PUBLIC_SOURCES}.")
        raise FileNotFoundError(f"benchmark {spec.name}: {path} not found in data directory {data_dir}.{hint}")
    return path


def load_benchmark(spec: BenchmarkSpec, path: str | os.PathLike, limit: int | None = None) -> Benchmark:
    """Reads a benchmark JSONL file (UTF-8, one JSON object per line, blank lines ignored).

    Raises BenchmarkFormatError naming the file and 1-based line for malformed JSON, a line that is not an
    object, a missing or empty problem/answer field, an answer of the wrong type, a GSM8K-style answer
    without ``####``, and a duplicate id. `limit` keeps the first `limit` problems (all lines are still
    checked), as does `spec.limit` (the smaller one wins). `sha256` is the whole file's hash.
    """
    path = Path(path)
    raw = path.read_bytes()
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line_number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        obj = _parse_line(path, line_number, line)
        problem = _problem_from_object(spec, path, line_number, obj, len(problems))
        if problem.problem_id in first_line:
            raise BenchmarkFormatError(path, line_number, f"duplicate id {problem.problem_id!r} "
                                       f"(first on line {first_line[problem.problem_id]})")
        first_line[problem.problem_id] = line_number
        problems.append(problem)
    if not problems:
        raise BenchmarkFormatError(path, None, "no problems (the file is empty)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    limits = [n for n in (limit, spec.limit) if n is not None]
    if limits:
        problems = problems[: min(limits)]
    return Benchmark(spec, path, hashlib.sha256(raw).hexdigest(), tuple(problems))


def load_benchmarks(
    names: list[str] | tuple[str, ...], data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[Benchmark]:
    """Loads benchmarks named as on the command line (``gsm8k``, ``synthetic=/tmp/s.jsonl``, see
    :func:`parse_benchmark_arg`); `data_dir` defaults to :func:`default_data_dir`. Names must be distinct."""
    data_dir = default_data_dir() if data_dir is None else data_dir
    benchmarks = []
    for text in names:
        spec, explicit = parse_benchmark_arg(text)
        benchmarks.append(load_benchmark(spec, resolve_benchmark_path(spec, explicit, data_dir), limit))
    seen = [b.name for b in benchmarks]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a benchmark is named twice in {list(names)}")
    return benchmarks


def _parse_line(path: Path, line_number: int, line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise BenchmarkFormatError(path, line_number, f"not valid UTF-8: {error}") from error
    except json.JSONDecodeError as error:
        raise BenchmarkFormatError(path, line_number, f"malformed JSON: {error}") from error
    if not isinstance(obj, dict):
        raise BenchmarkFormatError(path, line_number, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _problem_from_object(spec: BenchmarkSpec, path: Path, line: int, obj: dict[str, Any], index: int) -> Problem:
    def field(key: str, role: str) -> Any:
        if key not in obj:
            raise BenchmarkFormatError(path, line, f"missing {role} field {key!r} (benchmark {spec.name}; "
                                       f"the line has {sorted(obj)})")
        return obj[key]

    if spec.task == "code":
        return _code_problem(spec, path, line, obj, index)
    text = field(spec.problem_field, "problem")
    if not isinstance(text, str) or not text.strip():
        raise BenchmarkFormatError(path, line, f"problem field {spec.problem_field!r} must be a non-empty string, "
                                   f"got {text!r}")
    golds = _gold_answers(spec, path, line, field(spec.answer_field, "answer"))
    if spec.id_field is None:
        problem_id = f"{spec.name}-{line}"
    else:
        value = field(spec.id_field, "id")
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise BenchmarkFormatError(path, line, f"id field {spec.id_field!r} must be a string or an integer, "
                                       f"got {value!r}")
        problem_id = str(value)
    return Problem(problem_id, index, line, text, golds)


def _code_problem(spec: BenchmarkSpec, path: Path, line: int, obj: dict[str, Any], index: int) -> Problem:
    """A code problem: the text a model is given and its tests (encoded as its one gold answer)."""
    from areal_async.data.loaders import code_prompt
    from areal_async.reward.code_verifier import encoded_tests

    text = code_prompt(obj)
    if text is None:
        raise BenchmarkFormatError(path, line, f"no problem text for a code problem (benchmark {spec.name}; the line "
                                   f"has {sorted(obj)})")
    try:
        tests = encoded_tests(obj)
    except ValueError as error:
        raise BenchmarkFormatError(path, line, f"{error} (benchmark {spec.name})") from None
    key = spec.id_field or "task_id"
    problem_id = str(obj[key]) if key in obj else f"{spec.name}-{line}"
    return Problem(problem_id, index, line, text, (tests,))


def _gold_answers(spec: BenchmarkSpec, path: Path, line: int, value: Any) -> tuple[str, ...]:
    """The gold answers of one line, after `spec.answer_format`; an empty answer is an error, never a zero."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [str(value)]
    elif isinstance(value, str):
        values = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        values = list(value)
    else:
        raise BenchmarkFormatError(path, line, f"answer field {spec.answer_field!r} must be a string, a number or a "
                                   f"non-empty list of strings, got {value!r}")
    if spec.answer_format == "after_hashes":
        values = [_after_hashes(path, line, v) for v in values]
    golds = tuple(v.strip() for v in values)
    if not all(golds):
        raise BenchmarkFormatError(path, line, f"answer field {spec.answer_field!r} is empty")
    return golds


def _after_hashes(path: Path, line: int, answer: str) -> str:
    """GSM8K: the text after the last ``####`` line, with thousands commas removed (``2,125`` -> ``2125``)."""
    for text_line in reversed(answer.strip().splitlines()):
        match = _HASHES_LINE.search(text_line)
        if match:
            return _THOUSANDS_COMMA.sub("", match.group(1).strip())
    raise BenchmarkFormatError(path, line, "answer has no '#### <answer>' line (answer format after_hashes)")


def write_synthetic_benchmark(path: str | os.PathLike, count: int, seed: int = 1, spec=None) -> Path:
    """Writes `count` held-out arithmetic problems as a benchmark JSONL (``id``, ``problem``, ``answer``).

    The problems come from the synthetic task's held-out split, which training never draws from. With the
    defaults (seed 1, the default ArithmeticConfig) they are the first `count` problems of the trainer's
    held-out set (data.seed 0 + 1). ``problem`` is the bare expression (``37+45``); the ``boxed`` prompt type
    turns it back into the training prompt ``Q: 37+45\\nA: ``. ``answer`` is the integer value as a string.
    """
    from areal_async.config import ArithmeticConfig
    from areal_async.data.synthetic import arithmetic_problems, evaluate_expression, prompt_text

    records = arithmetic_problems(count, spec or ArithmeticConfig(), seed=seed, held_out=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        expression = record.prompt.removeprefix("Q: ").removesuffix("\nA: ")
        if prompt_text(expression) != record.prompt:
            raise AssertionError(f"unexpected synthetic prompt {record.prompt!r}")
        lines.append(json.dumps({"id": record.query_id, "problem": expression,
                                 "answer": str(evaluate_expression(expression))}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
