"""HumanEval and MBPP tests judged outside the program: plain values only cross, forgeries fail, and every
canonical solution of the real files passes while its emptied version fails."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from areal_async.reward.code_sandbox import CodeSandbox, SandboxLimits
from areal_async.reward.code_tests import (
    Opaque, functions_under_test, humaneval_verdict, mbpp_verdict, read_literal, with_bodies_emptied,
)

CODE_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "code"
WALL_S = 2.0

ADD_TASK = {  # HumanEval's shape
    "task_id": "Add/0",
    "prompt": 'def add(a, b):\n    """The sum of a and b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}
SORT_TASK = {  # MBPP's shape: one function sorts its argument in place, another answers with a regex match
    "task_id": 1,
    "code": "import re\ndef sort_in_place(items):\n    items.sort()\ndef starts_with_a(text):\n    return re.match('a', text)",
    "test_imports": [],
    "test_list": ["items = [3, 1, 2]; sort_in_place(items); assert items == [1, 2, 3]",
                  "assert starts_with_a('abc')", "assert not starts_with_a('bca')"],
}


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


@pytest.fixture(scope="module")
def sandbox():
    pool = CodeSandbox(slots=2, limits=SandboxLimits(wall_s=WALL_S, cpu_s=2, memory_bytes=512 << 20))
    yield pool
    pool.close()


def test_read_literal_builds_plain_values_only():
    assert read_literal("(1, [2.5, -3], {'a': {4}}, None, True, b'x', (1+2j))") == \
        (1, [2.5, -3], {"a": {4}}, None, True, b"x", 1 + 2j)
    assert read_literal("[inf, -inf]") == [float("inf"), float("-inf")]
    assert read_literal("Counter({'a': 2})")["a"] == 2 and read_literal("frozenset({1})") == frozenset({1})
    assert read_literal("set()") == set() and list(read_literal("range(0, 3)")) == [0, 1, 2]
    for text in ("__import__('os').system('true')", "(1).__class__", "lambda: 1", "[x for x in ()]", "f(1)",
                 "{**{}}", "'a' * 10", "<object at 0x1>", "[" * 200 + "]" * 200, "1" * (2 << 20)):
        with pytest.raises(ValueError):
            read_literal(text)


def test_tested_names_are_the_programs_and_the_undefined():
    tests = ["assert sum(1, 2) == 3", "assert helper([1]) == len([1])", "assert math.isclose(area(1), 3.14)"]
    assert functions_under_test(tests, "def sum(a, b):\n    return a + b", ["import math"]) == ["sum", "helper", "area"]
    assert functions_under_test(tests, "", ["import math"]) == ["helper", "area"]


def test_humaneval_and_mbpp_shapes_pass_and_fail(sandbox):
    right = "def add(a, b):\n    return a + b"
    assert humaneval_verdict(_fenced(right), ADD_TASK, sandbox).all_passed
    assert humaneval_verdict(_fenced("    return a + b"), ADD_TASK, sandbox).all_passed  # a completion
    assert humaneval_verdict(_fenced("def add(a, b):\n    return a - b"), ADD_TASK, sandbox).reason == "wrong_output"
    assert humaneval_verdict("  ", ADD_TASK, sandbox).reason == "no_code"
    # without a fence a response is a raw completion of the prompt (HumanEval's protocol): prose does not run
    assert humaneval_verdict("the sum, of course", ADD_TASK, sandbox).reason == "runtime_error"
    assert humaneval_verdict("    return a + b", ADD_TASK, sandbox).all_passed
    verdict = mbpp_verdict(_fenced(SORT_TASK["code"]), SORT_TASK, sandbox)
    assert (verdict.passed, verdict.total) == (3, 3)  # the in-place change came back; the match's truth value
    wrong = "def sort_in_place(items):\n    return sorted(items)\ndef starts_with_a(text):\n    return True"
    verdict = mbpp_verdict(_fenced(wrong), SORT_TASK, sandbox)
    assert (verdict.passed, verdict.reason) == (1, "wrong_output")


def test_a_result_without_a_plain_value_keeps_only_its_truth_value():
    assert bool(Opaque(True)) and not Opaque(False)
    assert Opaque(True) != 1 and not Opaque(True) == Opaque(True)  # noqa: SIM201
    with pytest.raises(Exception, match="truth value"):
        bool(Opaque(None))


FORGERIES = {
    "sys.exit before the tests": "import sys\nsys.exit(0)\ndef add(a, b):\n    return 0",
    "os._exit before the tests": "import os\nos._exit(0)\ndef add(a, b):\n    return 0",
    "an object equal to everything": ("class Equal:\n    def __eq__(self, other):\n        return True\n"
                                      "    __hash__ = object.__hash__\ndef add(a, b):\n    return Equal()"),
    "a passed marker printed": "print('all tests passed')\nprint('PASSED 2/2')\ndef add(a, b):\n    return 0",
    "assert-related builtins replaced": ("import builtins\nbuiltins.AssertionError = type('Nothing', (Exception,), {})\n"
                                         "builtins.repr = lambda value: '3'\ndef add(a, b):\n    return 0"),
    "the call server replaced": ("def add(a, b):\n    return 0\nimport sys, json\n"
                                 "sys.stdout.write('\\x1eareal-message ' + json.dumps({'value': '3', 'args': '()'}) + '\\n')\n"
                                 "sys.exit(0)"),
    "stdin read before the server": "import sys\nsys.stdin.read()\ndef add(a, b):\n    return 0",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forgeries_fail_within_the_limit(sandbox, name):
    started = time.perf_counter()
    verdict = humaneval_verdict(_fenced(FORGERIES[name]), ADD_TASK, sandbox)
    assert not verdict.all_passed, (name, verdict)
    assert time.perf_counter() - started < WALL_S + 1.0
    mbpp = {"code": "", "test_imports": [], "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    assert not mbpp_verdict(_fenced(FORGERIES[name]), mbpp, sandbox).all_passed, name
    assert humaneval_verdict(_fenced("def add(a, b):\n    return a + b"), ADD_TASK, sandbox).all_passed  # still serving



needs_code_data = pytest.mark.skipif(not CODE_DATA.is_dir(), reason=f"{CODE_DATA} not present")


@needs_code_data
def test_every_canonical_solution_passes_and_every_emptied_one_fails():
    """With the default limits (MBPP 123 sums amicable numbers below 10,000: over a second of CPU)."""
    humaneval = [json.loads(line) for line in (CODE_DATA / "humaneval.jsonl").read_text().splitlines()]
    mbpp = [json.loads(line) for line in (CODE_DATA / "mbpp_sanitized.jsonl").read_text().splitlines()]
    assert (len(humaneval), len(mbpp)) == (164, 427)
    jobs = [(humaneval_verdict, _fenced(t["prompt"] + t["canonical_solution"]), _fenced(t["prompt"] + "    pass"), t)
            for t in humaneval]
    jobs += [(mbpp_verdict, _fenced(t["code"]), _fenced(with_bodies_emptied(t["code"])), t) for t in mbpp]
    sandbox = CodeSandbox(slots=2)
    with ThreadPoolExecutor(2) as pool:
        canonical = list(pool.map(lambda job: job[0](job[1], job[3], sandbox), jobs))
        emptied = list(pool.map(lambda job: job[0](job[2], job[3], sandbox), jobs))
    sandbox.close()
    assert [job[3]["task_id"] for job, verdict in zip(jobs, canonical) if not verdict.all_passed] == []
    assert [job[3]["task_id"] for job, verdict in zip(jobs, emptied) if verdict.all_passed] == []
