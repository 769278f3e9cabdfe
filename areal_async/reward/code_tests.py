"""HumanEval and MBPP tests, judged here while the model's program runs in the code sandbox.

The program runs behind a small call server (`CALL_SERVER`, appended to it): it reads one request per stdin line
(a function name and the arguments as a Python literal), calls the function and answers with `repr` of the result
(and of the arguments, which the call may have changed in place). The tests are the datasets' own code (trusted):
they run in this process, with the tested function replaced by a `RemoteFunction` that makes such calls. A reply
is read back by `read_literal`, which builds plain values only (numbers, strings, bytes, tuples, lists, dicts,
sets and a few standard containers) and nothing that runs code, so an assertion compares values this process
built. What the program does to its own interpreter stays there:
- an early `sys.exit(0)` or `os._exit(0)` ends the server before the first reply: the test fails;
- an object whose `__eq__` is always true has no literal `repr`: the call fails;
- replacing builtins, `AssertionError` or the server changes only the program's process;
- printing a "passed" line: lines without the message marker are skipped, and the verdict is never read from the
  program's output.
The program never sees the tests or the expected values (they stay here).
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import re
from collections import Counter, OrderedDict, deque
from decimal import Decimal
from fractions import Fraction

from areal_async.reward.code_reward import CodeVerdict, call_verdict, extract_code, stdio_verdict
from areal_async.reward.code_sandbox import MESSAGE_MARKER, Channel, ChannelClosed, CodeSandbox

MAX_LITERAL_CHARS = 1 << 20
MAX_LITERAL_DEPTH = 64

CALL_SERVER = f"""

def __areal_serve():
    import collections, decimal, fractions, json, sys, types
    known = {{"inf": float("inf"), "nan": float("nan"), "Counter": collections.Counter,
             "OrderedDict": collections.OrderedDict, "deque": collections.deque, "Decimal": decimal.Decimal,
             "Fraction": fractions.Fraction}}
    lazy = (types.GeneratorType, map, filter, zip, reversed, enumerate, type({{}}.keys()), type({{}}.values()),
            type({{}}.items()))

    def plain(value):
        if isinstance(value, collections.defaultdict):
            return dict(value)
        return list(value) if isinstance(value, lazy) else value

    for line in sys.stdin:
        request = json.loads(line)
        try:
            arguments = eval(request["args"], dict(known))
            value = globals()[request["name"]](*arguments)
            try:
                truthy = bool(value)
            except BaseException:
                truthy = None
            reply = {{"value": repr(plain(value)), "truthy": truthy, "args": repr(arguments)}}
        except BaseException as error:
            reply = {{"error": type(error).__name__}}
        sys.stdout.write({MESSAGE_MARKER!r} + json.dumps(reply) + "\\n")
        sys.stdout.flush()


__areal_serve()
"""

_CALLABLE = {"set": set, "frozenset": frozenset, "Counter": Counter, "OrderedDict": OrderedDict, "deque": deque,
             "Decimal": Decimal, "Fraction": Fraction, "range": range}
_NAMED = {"inf": math.inf, "nan": math.nan}


def read_literal(text: str):
    """The plain value `text` writes (the repr of one): literals, tuples, lists, dicts, sets, inf and nan, complex
    numbers, and set(), frozenset(), Counter(), OrderedDict(), deque(), Decimal(), Fraction() and range() of
    those. Raises ValueError on anything else, or on text longer than MAX_LITERAL_CHARS or nested deeper than
    MAX_LITERAL_DEPTH."""
    if len(text) > MAX_LITERAL_CHARS:
        raise ValueError("literal too long")
    try:
        tree = ast.parse(text, mode="eval")
        return _build(tree.body, 0)
    except (SyntaxError, RecursionError, MemoryError, TypeError, ArithmeticError) as error:
        raise ValueError(f"not a plain value: {type(error).__name__}") from None


def _build(node: ast.AST, depth: int):
    if depth > MAX_LITERAL_DEPTH:
        raise ValueError("literal nested too deeply")
    inner = depth + 1
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_build(item, inner) for item in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise ValueError("not a plain value: ** in a dict")
        return {_build(key, inner): _build(value, inner) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _build(node.operand, inner)
        if isinstance(operand, bool) or not isinstance(operand, (int, float, complex)):
            raise ValueError("not a plain value: sign of a non-number")
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # complex: (1+2j)
        left, right = _build(node.left, inner), _build(node.right, inner)
        if not (isinstance(right, complex) and isinstance(left, (int, float))):
            raise ValueError("not a plain value: arithmetic")
        return left + right if isinstance(node.op, ast.Add) else left - right
    if isinstance(node, ast.Name) and node.id in _NAMED:
        return _NAMED[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLABLE \
            and not node.keywords:
        return _CALLABLE[node.func.id](*[_build(argument, inner) for argument in node.args])
    raise ValueError(f"not a plain value: {type(node).__name__}")


class CallFailed(Exception):
    """The tested function raised in the sandbox (its exception's name), or its reply could not be read."""


class Opaque:
    """A result with no plain value (a regex match, an object of the program's own class): only its truth value
    crosses (`assert f(x)`), and it equals nothing."""

    def __init__(self, truthy: bool | None) -> None:
        self.truthy = truthy

    def __bool__(self) -> bool:
        if self.truthy is None:
            raise CallFailed("the result has no truth value")
        return self.truthy

    def __eq__(self, other) -> bool:
        return False

    def __ne__(self, other) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Opaque(truthy={self.truthy})"


class RemoteFunction:
    """Calls `name` in the program behind `channel`. A list, dict or set argument that the call changed in place
    is changed the same way here."""

    def __init__(self, channel: Channel, name: str) -> None:
        self.channel, self.name = channel, name

    def __call__(self, *arguments):
        self.channel.send(json.dumps({"name": self.name, "args": repr(arguments)}))
        try:
            reply = json.loads(self.channel.receive())
            if "error" in reply:
                raise CallFailed(str(reply["error"]))
            try:
                value = read_literal(reply["value"])
            except ValueError:
                value = Opaque(reply["truthy"] if isinstance(reply["truthy"], bool) else None)
            try:
                after = read_literal(reply["args"])
            except ValueError:
                after = None  # arguments the call turned into something else: nothing to copy back
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as error:
            raise CallFailed(f"unreadable reply: {error}") from None
        if isinstance(after, tuple) and len(after) == len(arguments):
            for before, changed in zip(arguments, after):
                _copy_into(before, changed)
        return value


def _copy_into(target, source) -> None:
    if isinstance(target, list) and isinstance(source, list):
        target[:] = source
    elif isinstance(target, (dict, set)) and type(source) is type(target):
        target.clear()
        target.update(source)


def _ended_reason(channel: Channel) -> str:
    """Why the program can answer no more: it exited (runtime_error), timed out or printed too much."""
    return "runtime_error" if channel.status == "closed" else channel.status


def _run_test(run, channel: Channel) -> str:
    """Runs one test (`run()`); its reason: passed, wrong_output (an assertion or another exception of the test),
    runtime_error (the function raised or answered no plain value), or how the program ended."""
    try:
        run()
        return "passed"
    except ChannelClosed:
        return _ended_reason(channel)
    except CallFailed:
        return "runtime_error"
    except Exception:  # noqa: BLE001 - the dataset's assertions and whatever its checks raise on a wrong value
        return "wrong_output"


def _judged(program: str, tests, sandbox: CodeSandbox) -> CodeVerdict:
    """Runs `program` with the call server; `tests(channel)` yields one callable per test case. Cases after the
    program's end fail with its reason."""

    def judge(channel: Channel) -> tuple[int, int, str]:
        passed, reason, cases = 0, "passed", list(tests(channel))
        for run in cases:
            outcome = _run_test(run, channel) if channel.status is None else _ended_reason(channel)
            passed += outcome == "passed"
            if outcome != "passed" and reason == "passed":
                reason = outcome
        return passed, len(cases), reason

    result, _ = sandbox.converse(program + CALL_SERVER, judge)  # judge catches ChannelClosed: never None
    return CodeVerdict(*result)


def _imports_of(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (before its first def)."""
    head = prompt.split("\ndef ", 1)[0]
    return "".join(line + "\n" for line in head.splitlines() if line.startswith(("import ", "from ")))


def humaneval_program(code: str, task: dict) -> str:
    """The program for a HumanEval task: the response's code when it defines the entry point (with the prompt's
    imports), else the prompt followed by the code (a completion of the function's body)."""
    if re.search(rf"^\s*def\s+{re.escape(task['entry_point'])}\s*\(", code, re.MULTILINE):
        return _imports_of(task["prompt"]) + code
    return task["prompt"] + code


def humaneval_verdict(response: str, task: dict, sandbox: CodeSandbox) -> CodeVerdict:
    """One test case: the task's `check(candidate)` with its entry point called in the sandbox. The prompt's
    other functions, which some checks call, are defined here from the prompt. A response without a fenced block
    is a raw completion of the prompt (HumanEval's own protocol)."""
    code = extract_code(response)
    if code is None:
        code = response if response.strip() else None
    if code is None:
        return CodeVerdict(0, 1, "no_code")

    def tests(channel: Channel):
        namespace: dict = {}
        exec(task["prompt"], namespace)  # noqa: S102 - the dataset's own code
        exec(task["test"], namespace)  # noqa: S102
        candidate = RemoteFunction(channel, task["entry_point"])
        namespace[task["entry_point"]] = candidate  # some checks call it by name
        return [lambda: namespace["check"](candidate)]

    return _judged(humaneval_program(code, task), tests, sandbox)


def _top_level(source: str, kinds: tuple[type, ...]) -> list[ast.stmt]:
    try:
        return [node for node in ast.parse(source).body if isinstance(node, kinds)]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []


def functions_under_test(test_list, program: str = "", test_imports=()) -> list[str]:
    """The functions an MBPP task's tests call from the program: those the program defines at its top level (a
    `sum` of its own too), and every other called name that neither Python's builtins nor the test imports
    define (a missing one then fails the call, not the judge)."""
    defined = {node.name for node in _top_level(program, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    bound = set(dir(builtins))
    for line in test_imports:
        for node in _top_level(line, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    names = []
    for test in test_list:
        for node in ast.walk(ast.parse(test)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in names \
                    and (node.func.id in defined or node.func.id not in bound):
                names.append(node.func.id)
    return names


def mbpp_verdict(response: str, task: dict, sandbox: CodeSandbox) -> CodeVerdict:
    """One test case per `test_list` assertion, after `test_imports` and the reference program's imports, with the
    functions they call run in the sandbox."""
    code = extract_code(response)
    tests_source = task["test_list"]
    if code is None:
        return CodeVerdict(0, len(tests_source), "no_code")

    def tests(channel: Channel):
        namespace: dict = {}
        # the tests ran in the reference program's module: its imports (trusted, not the response's) are theirs
        reference_imports = _top_level(task.get("code", ""), (ast.Import, ast.ImportFrom))
        for line in [*task.get("test_imports", ()), *(ast.unparse(node) for node in reference_imports)]:
            exec(line, namespace)  # noqa: S102 - the dataset's own code
        for name in functions_under_test(tests_source, code, task.get("test_imports", ())):
            namespace[name] = RemoteFunction(channel, name)
        return [lambda test=test: exec(test, namespace) for test in tests_source]  # noqa: S102

    return _judged(code, tests, sandbox)


def with_bodies_emptied(code: str) -> str:
    """`code` with every function's body replaced by `pass`: a reference solution turned into one that must fail."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = [ast.Pass()]
    return ast.unparse(tree)


def code_verdict(response: str, problem: dict, sandbox: CodeSandbox) -> CodeVerdict:
    """The response judged by the problem's tests, in whichever format it carries: HumanEval (`test` and
    `entry_point`), MBPP (`test_list`) or AReaL's `input_output` (a JSON object or its text: `inputs`, `outputs`,
    and `fn_name` for the call-based mode). Raises ValueError naming the keys when it carries none."""
    if "test" in problem and "entry_point" in problem:
        return humaneval_verdict(response, {"prompt": "", **problem}, sandbox)
    if "test_list" in problem:
        return mbpp_verdict(response, problem, sandbox)
    if "input_output" in problem:
        cases = problem["input_output"]
        cases = json.loads(cases) if isinstance(cases, str) else cases
        if not isinstance(cases, dict) or not {"inputs", "outputs"} <= set(cases):
            raise ValueError("input_output needs 'inputs' and 'outputs'")
        if cases.get("fn_name"):
            return call_verdict(response, cases["fn_name"], cases["inputs"], cases["outputs"], sandbox)
        return stdio_verdict(response, cases["inputs"], cases["outputs"], sandbox)
    raise ValueError("no tests: a code problem needs 'test' and 'entry_point' (HumanEval), 'test_list' (MBPP) or "
                     "'input_output'")
