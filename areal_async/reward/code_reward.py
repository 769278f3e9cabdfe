"""Rewards for model-written code, judged outside the code's process.

`extract_code` takes the program from a response: the last fenced block marked python/py (else the last unmarked
fenced block). `stdio_verdict` runs it once per test case of AReaL's `input_output` format in stdin/stdout mode
(`{"inputs": [...], "outputs": [...]}`, no `fn_name`) in the code sandbox and compares what it printed with the
expected output here, in the parent: the program never judges itself, so an early `sys.exit(0)` or a printed
"passed" marker scores as what it printed. Outputs compare line by line with trailing whitespace removed (as
AReaL's harness does for stdin/stdout problems).

`call_verdict` judges the call-based mode (`fn_name`): a harness appended to the program calls the function with
each case's arguments and prints each result as a JSON line behind a marker; the parent compares the decoded values
with the expected ones, which the program never sees (a value JSON cannot encode, such as an object with its own
`__eq__`, is a failure).

HumanEval's and MBPP's assertion tests are judged in `areal_async/reward/code_tests.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from areal_async.reward.code_sandbox import CodeSandbox
from areal_async.reward.sandbox import Verdict

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The last fenced block marked python or py, else the last fenced block without a language; None when the
    response has neither."""
    blocks = [(language.lower(), body) for language, body in _FENCE.findall(response)]
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [body for language, body in blocks if language in wanted]
        if chosen:
            return chosen[-1]
    return None


def normalise_output(text: str) -> list[str]:
    """Lines with trailing whitespace removed and trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@dataclass(frozen=True)
class CodeVerdict:
    """passed: test cases whose output matched, of `total`; reason: "passed", "wrong_output", "no_code",
    "runtime_error", "timeout", "output_limit" (the first failing case's)."""

    passed: int
    total: int
    reason: str

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _check_cases(inputs: Sequence, outputs: Sequence) -> None:
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(f"input_output needs as many outputs as inputs, at least one: got {len(inputs)} and "
                         f"{len(outputs)}")


def stdio_verdict(response: str, inputs: Sequence[str], outputs: Sequence[str], sandbox: CodeSandbox) -> CodeVerdict:
    """Runs the response's program on each input (stdin) and compares its stdout with the expected output."""
    _check_cases(inputs, outputs)
    code = extract_code(response)
    if code is None:
        return CodeVerdict(0, len(inputs), "no_code")
    executions = sandbox.run_many([(code, text.encode()) for text in inputs])
    passed, reason = 0, "passed"
    for execution, expected in zip(executions, outputs):
        if execution.status == "ok" and normalise_output(execution.stdout.decode(errors="replace")) == \
                normalise_output(expected):
            passed += 1
        elif reason == "passed":
            reason = {"ok": "wrong_output", "error": "runtime_error"}.get(execution.status, execution.status)
    return CodeVerdict(passed, len(inputs), reason)


RESULT_MARKER = "\x1eareal-result "  # a record separator, unlikely in program output; a forged line must be right


def _call_harness(fn_name: str) -> str:
    """Appended to the program: reads the cases' arguments from stdin, prints each call's result as JSON."""
    return f"""

def __areal_run_cases():
    import json, sys
    for arguments in json.loads(sys.stdin.read()):
        try:
            line = json.dumps({{"value": {fn_name}(*arguments)}})
        except BaseException as error:
            line = json.dumps({{"error": type(error).__name__}})
        sys.stdout.write({RESULT_MARKER!r} + line + "\\n")
        sys.stdout.flush()


__areal_run_cases()
"""


def _same_value(got, expected) -> bool:
    """JSON-level equality (tuples compare as lists); AReaL's files often wrap a single expected value in a list."""
    expected = json.loads(json.dumps(expected))
    return got == expected or (isinstance(expected, list) and len(expected) == 1 and got == expected[0])


def call_verdict(response: str, fn_name: str, inputs: Sequence[Sequence], outputs: Sequence,
                 sandbox: CodeSandbox) -> CodeVerdict:
    """Calls the response's `fn_name` with each case's arguments (one execution) and compares the results."""
    _check_cases(inputs, outputs)
    if not fn_name.isidentifier():
        raise ValueError(f"input_output's fn_name must be a Python name, got {fn_name!r}")
    code = extract_code(response)
    if code is None:
        return CodeVerdict(0, len(inputs), "no_code")
    execution = sandbox.run(code + _call_harness(fn_name), json.dumps([list(a) for a in inputs]).encode())
    results = [line[len(RESULT_MARKER):] for line in execution.stdout.decode(errors="replace").split("\n")
               if line.startswith(RESULT_MARKER)]
    passed, reason = 0, "passed"
    for index, expected in enumerate(outputs):
        try:
            result = json.loads(results[index]) if index < len(results) else {}
        except json.JSONDecodeError:
            result = {}
        if "value" in result and _same_value(result["value"], expected):
            passed += 1
        elif reason == "passed":
            reason = ("wrong_output" if "value" in result else "runtime_error" if "error" in result
                      else execution.status if execution.status in ("timeout", "output_limit") else "runtime_error")
    return CodeVerdict(passed, len(inputs), reason)


def code_reward(verdict: CodeVerdict, correct_reward: float = 5.0, incorrect_reward: float = -5.0,
                partial_credit: bool = False) -> float:
    """+correct when every test passed, else incorrect (AReaL's scoring); with `partial_credit`, the fraction
    passed interpolates between the two."""
    credit = verdict.passed / max(1, verdict.total) if partial_credit else None
    return Verdict(verdict.all_passed, credit=credit).reward(correct_reward, incorrect_reward)
