"""Code rewards: the program from a response, and stdin/stdout tests judged in the parent, which the program
cannot forge."""

import pytest

from areal_async.reward.code_reward import (
    CodeVerdict, call_verdict, code_reward, extract_code, normalise_output, stdio_verdict,
)
from areal_async.reward.code_sandbox import CodeSandbox, SandboxLimits

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def _fenced(body: str, language: str = "python") -> str:
    return f"```{language}\n{body.rstrip()}\n```"


def test_the_last_python_block_is_the_program():
    response = f"First try:\n{_fenced('print(1)')}\nBetter:\n{_fenced('print(2)', 'py')}\nAs text:\n{_fenced('x', 'text')}"
    assert extract_code(response) == "print(2)\n"
    assert extract_code(f"{_fenced('print(3)', '')} and {_fenced('int main(){}', 'cpp')}") == "print(3)\n"
    assert extract_code("print(4) without a fence") is None
    assert extract_code(_fenced("int main(){}", "cpp")) is None


def test_outputs_compare_by_line_without_trailing_whitespace():
    assert normalise_output("3  \r\n4\n\n") == normalise_output("3\n4") == ["3", "4"]
    assert normalise_output(" 3") != normalise_output("3")


@pytest.fixture(scope="module")
def sandbox():
    pool = CodeSandbox(slots=2, limits=SandboxLimits(wall_s=2.0, cpu_s=2, memory_bytes=512 << 20))
    yield pool
    pool.close()


CASES = (["1 2", "10 -3"], ["3", "7"])


@pytest.mark.parametrize("program, passed, reason", [
    (ADD, 2, "passed"),
    ("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n", 1, "wrong_output"),
    ("raise ValueError('no')\n", 0, "runtime_error"),
    ("while True:\n    pass\n", 0, "timeout"),
    # forging: it is what the program prints that the parent compares, never its own judgment
    ("import sys\nsys.exit(0)\nprint(3)\n", 0, "wrong_output"),
    ("import os\nos._exit(0)\n", 0, "wrong_output"),
    ("print('All tests passed')\n", 0, "wrong_output"),
    ("class Equal(str):\n    def __eq__(self, other):\n        return True\nprint(Equal('x'))\n", 0, "wrong_output"),
])
def test_stdin_stdout_cases_are_judged_in_the_parent(sandbox, program, passed, reason):
    verdict = stdio_verdict(f"Here it is:\n{_fenced(program)}", *CASES, sandbox)
    assert verdict == CodeVerdict(passed, 2, reason)


def test_no_program_scores_as_a_failure_and_bad_tests_are_refused(sandbox):
    assert stdio_verdict("I would add them.", *CASES, sandbox) == CodeVerdict(0, 2, "no_code")
    with pytest.raises(ValueError, match="as many outputs as inputs"):
        stdio_verdict(_fenced(ADD), ["1 2"], ["3", "4"], sandbox)


def test_rewards_all_or_nothing_or_partial():
    assert code_reward(CodeVerdict(2, 2, "passed")) == 5.0
    assert code_reward(CodeVerdict(1, 2, "wrong_output")) == -5.0
    assert code_reward(CodeVerdict(1, 2, "wrong_output"), partial_credit=True) == 0.0
    assert code_reward(CodeVerdict(0, 2, "no_code"), partial_credit=True) == -5.0


CALL_CASES = ([[1, 2], [10, -3], [0, 0]], [3, [7], 0])  # AReaL's files may wrap an expected value in a list


@pytest.mark.parametrize("program, passed, reason", [
    ("def add(a, b):\n    return a + b\n", 3, "passed"),
    ("def add(a, b):\n    return a + b if a < 5 else 0\n", 2, "wrong_output"),
    ("def add(a, b):\n    return a / 0\n", 0, "runtime_error"),
    ("def add(a, b):\n    while True:\n        pass\n", 0, "timeout"),
    ("def plus(a, b):\n    return a + b\n", 0, "runtime_error"),  # not the function asked for
    # forging: the parent compares decoded values it never sent
    ("class Equal:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Equal()\n", 0,
     "runtime_error"),
    ("import os\ndef add(a, b):\n    os._exit(0)\n", 0, "runtime_error"),
    ("import sys\nprint('All tests passed')\nsys.exit(0)\ndef add(a, b):\n    return a + b\n", 0, "runtime_error"),
    # a forged result line counts only where it holds the right value, as a hard-coded answer would
    ("print('\\x1eareal-result {\"value\": 3}')\ndef add(a, b):\n    return 0\n", 2, "wrong_output"),
])
def test_call_based_cases_are_judged_in_the_parent(sandbox, program, passed, reason):
    verdict = call_verdict(_fenced(program), "add", *CALL_CASES, sandbox)
    assert verdict == CodeVerdict(passed, 3, reason)
