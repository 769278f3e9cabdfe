"""The one tool-call format, Qwen/Hermes style, parsed and rendered by one pair of functions that training data,
evaluation and the chat client all use (so a call the model learned to write is the call the client reads):

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "37 * 41"}}
    </tool_call>

The tools a model may call are listed in the system message as one JSON object per line inside
``<tools></tools>`` (`render_tools`). A reply's text outside its ``<tool_call>`` blocks is its content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: `arguments` is the JSON object's text (as the OpenAI API carries it)."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> dict:
        return json.loads(self.arguments)


@dataclass
class ParsedReply:
    """An assistant reply split into its content, its well-formed calls, and what was wrong with the others
    (one sentence each, in the order they appear)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def parse_tool_calls(text: str, known_tools: set[str] | None = None, id_prefix: str = "call") -> ParsedReply:
    """Splits `text` into content and calls. A block whose body is not a JSON object with a string "name" and an
    object (or JSON-object text) "arguments", names a tool outside `known_tools`, or an unclosed ``<tool_call>``
    is malformed: it is left out of the calls and described in `malformed`. Call ids are `id_prefix`-0, -1, ..."""
    calls: list[ToolCall] = []
    malformed: list[str] = []
    for body in _BLOCK.findall(text):
        problem, name, arguments = _read_call(body.strip(), known_tools)
        if problem:
            malformed.append(problem)
        else:
            calls.append(ToolCall(f"{id_prefix}-{len(calls)}", name, arguments))
    rest = _BLOCK.sub("", text)
    if OPEN in rest:
        malformed.append(f"a {OPEN} without its {CLOSE}")
        rest = rest[: rest.index(OPEN)]
    return ParsedReply(rest.strip(), calls, malformed)


def _read_call(body: str, known_tools: set[str] | None) -> tuple[str, str, str]:
    """(problem or "", name, arguments as JSON text) of one block's body."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        return f"the tool call is not valid JSON ({error.msg} at character {error.pos})", "", ""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'the tool call must be a JSON object with a string "name"', "", ""
    name, arguments = call["name"], call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text, as the API carries them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f'the "arguments" of {name!r} are not a JSON object', "", ""
    if not isinstance(arguments, dict):
        return f'the "arguments" of {name!r} must be a JSON object', "", ""
    if known_tools is not None and name not in known_tools:
        return f"there is no tool {name!r} (tools: {', '.join(sorted(known_tools))})", "", ""
    return "", name, json.dumps(arguments, ensure_ascii=False)


def render_tool_call(name: str, arguments: dict | str) -> str:
    """One call as the model writes it (the inverse of `parse_tool_calls` for one block)."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def render_reply(content: str, calls: list[ToolCall] | list[dict] | None = None) -> str:
    """An assistant reply's text: its content, then each call on its own lines. `calls` are ToolCalls or
    OpenAI-style dicts ({"function": {"name", "arguments"}})."""
    parts = [content] if content else []
    for call in calls or []:
        if isinstance(call, ToolCall):
            parts.append(render_tool_call(call.name, call.arguments))
        else:
            parts.append(render_tool_call(call["function"]["name"], call["function"]["arguments"]))
    return "\n".join(parts)


def render_tools(schemas: list[dict]) -> str:
    """The tools block of a system message: each OpenAI-style tool schema as one JSON line."""
    lines = "\n".join(json.dumps(schema, ensure_ascii=False, sort_keys=True) for schema in schemas)
    return (f"You may call tools. Their signatures:\n<tools>\n{lines}\n</tools>\nTo call one, write\n"
            f'{OPEN}\n{{"name": <tool name>, "arguments": <a JSON object>}}\n{CLOSE}')
