"""The tools shipped for agents, and the toolbox that answers a reply's calls with tool messages.

A tool is any object with a `name`, an OpenAI-style function `schema` and `__call__(arguments) -> str` (the tool
message's text). It raises `ToolError` for a call it cannot answer (bad arguments, a failed execution); the toolbox
turns that, like a malformed call, into a tool message saying what was wrong, so the model sees it and learns.

- `Calculator`: exact arithmetic with sympy over + - * / ** % and parentheses, read by Python's `ast` (numbers and
  operators only: nothing is evaluated as code).
- `PythonTool`: runs a script in the code sandbox (areal_async/reward/code_sandbox.py: its time, memory, output
  and process limits, no network where the host allows a namespace) and answers with its output.
"""

from __future__ import annotations

import ast
from collections import Counter
from typing import Protocol, runtime_checkable

import sympy

from areal_async.agents.tool_calls import ParsedReply


class ToolError(Exception):
    """A call the tool cannot answer; the message is what the model is told."""


@runtime_checkable
class Tool(Protocol):
    name: str
    schema: dict

    def __call__(self, arguments: dict) -> str: ...


def function_schema(name: str, description: str, parameter: str, parameter_description: str) -> dict:
    """An OpenAI-style function tool with one required string parameter."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {parameter: {"type": "string",
                                                                    "description": parameter_description}},
                       "required": [parameter]}}}


_OPERATORS = {ast.Add: sympy.Add, ast.Sub: lambda a, b: a - b, ast.Mult: sympy.Mul, ast.Div: lambda a, b: a / b,
              ast.Pow: sympy.Pow, ast.Mod: sympy.Mod}


class Calculator:
    """Exact arithmetic: integers and decimals (as exact rationals), + - * / ** %, parentheses, unary minus.
    Powers are limited (|exponent| <= max_exponent, and a result of at most max_digits digits) so a call cannot
    hang the episode."""

    name = "calculator"
    schema = function_schema("calculator", "Exact arithmetic: + - * / ** % and parentheses over numbers.",
                             "expression", "for example (37 * 41) - 5")

    def __init__(self, max_length: int = 400, max_exponent: int = 512, max_digits: int = 2000) -> None:
        self.max_length, self.max_exponent, self.max_digits = max_length, max_exponent, max_digits

    def __call__(self, arguments: dict) -> str:
        expression = arguments.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise ToolError('calculator needs "expression", a non-empty string')
        if len(expression) > self.max_length:
            raise ToolError(f"the expression is longer than {self.max_length} characters")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError:
            raise ToolError(f"cannot read {expression!r} as arithmetic") from None
        value = self._evaluate(tree.body)
        if value.has(sympy.zoo, sympy.nan, sympy.oo):
            raise ToolError("division by zero")
        return str(value)

    def _evaluate(self, node: ast.AST) -> sympy.Expr:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Rational(repr(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self._evaluate(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = self._evaluate(node.left), self._evaluate(node.right)
            if isinstance(node.op, ast.Pow):
                self._check_power(left, right)
            if isinstance(node.op, (ast.Div, ast.Mod)) and right == 0:
                raise ToolError("division by zero")
            return _OPERATORS[type(node.op)](left, right)
        raise ToolError(f"only numbers, + - * / ** % and parentheses are allowed, not {ast.unparse(node)!r}")

    def _check_power(self, base: sympy.Expr, exponent: sympy.Expr) -> None:
        if not exponent.is_Integer or abs(int(exponent)) > self.max_exponent:
            raise ToolError(f"exponents must be integers of at most {self.max_exponent} in size")
        if base.is_Rational and base != 0:
            digits = abs(int(exponent)) * max(len(str(abs(base.p))), len(str(base.q)))
            if digits > self.max_digits:
                raise ToolError(f"the result would have more than {self.max_digits} digits")


class PythonTool:
    """Runs a script in a CodeSandbox (its limits); answers with stdout, or the error's last lines."""

    name = "python"
    schema = function_schema("python", "Runs a Python script and returns what it prints.", "code",
                             "a complete script; print what you need")

    def __init__(self, sandbox, max_chars: int = 2000) -> None:
        self.sandbox, self.max_chars = sandbox, max_chars

    def __call__(self, arguments: dict) -> str:
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolError('python needs "code", a non-empty string')
        execution = self.sandbox.run(code)
        output = execution.stdout.decode("utf-8", "replace")
        if execution.status == "ok":
            return output[-self.max_chars:] if output else "(no output)"
        if execution.status == "timeout":
            raise ToolError(f"the script ran past {self.sandbox.limits.wall_s:g} s and was stopped")
        if execution.status == "output_limit":
            raise ToolError("the script printed more than the output limit")
        error = execution.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ToolError("the script failed: " + "\n".join(error[-5:])[-self.max_chars:])


class ToolBox:
    """Answers a parsed reply's calls with tool messages, in order: each well-formed call with its tool's text
    (or what the tool said was wrong), then each malformed call with what was wrong. `counts` (a Counter of its
    own unless given) adds up calls by tool and outcome (`tool_<name>_ok`, `tool_<name>_error`) and malformed
    calls answered."""

    def __init__(self, tools: list[Tool], counts: Counter | None = None) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self.counts: Counter = Counter() if counts is None else counts

    @property
    def schemas(self) -> list[dict]:
        return [tool.schema for tool in self.tools.values()]

    def respond(self, reply: ParsedReply) -> list[dict]:
        """Tool messages ({"role": "tool", "tool_call_id", "name", "content"}) for `reply`'s calls."""
        messages = []
        for call in reply.calls:
            try:
                content = self.tools[call.name](call.parsed_arguments())
                self.counts[f"tool_{call.name}_ok"] += 1
            except ToolError as error:
                self.counts[f"tool_{call.name}_error"] += 1
                content = f"error: {error}"
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
        for problem in reply.malformed:
            self.counts["malformed_answered"] += 1
            messages.append({"role": "tool", "tool_call_id": "", "name": "", "content": f"error: {problem}"})
        return messages
