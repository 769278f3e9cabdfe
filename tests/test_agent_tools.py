"""The tool-call format (one parser, one renderer), the calculator, the python tool in the sandbox, and the toolbox
that answers calls with tool messages and counts what went wrong."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from areal_async.agents.tool_calls import parse_tool_calls, render_reply, render_tool_call, render_tools
from areal_async.agents.tools import Calculator, PythonTool, ToolBox, ToolError
from areal_async.reward.code_sandbox import CodeSandbox, SandboxLimits

TOOLS = {"calculator", "python"}


def test_a_reply_splits_into_content_and_calls():
    text = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 * 41"}}\n'
            '</tool_call>\n<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>')
    reply = parse_tool_calls(text, TOOLS)
    assert reply.content == "Let me compute."
    assert [(c.id, c.name, c.parsed_arguments()) for c in reply.calls] == [
        ("call-0", "calculator", {"expression": "37 * 41"}), ("call-1", "python", {"code": "print(1)"})]
    assert reply.malformed == []


@pytest.mark.parametrize("body, problem", [
    ('{"name": "calculator", "arguments": {"expression": "1+1"}', "not valid JSON"),
    ('["calculator"]', 'a string "name"'),
    ('{"arguments": {}}', 'a string "name"'),
    ('{"name": "calculator", "arguments": [1]}', 'must be a JSON object'),
    ('{"name": "calculator", "arguments": "not json"}', "are not a JSON object"),
    ('{"name": "search", "arguments": {}}', "there is no tool 'search' (tools: calculator, python)"),
])
def test_a_malformed_call_is_left_out_and_described(body, problem):
    reply = parse_tool_calls(f"so <tool_call>{body}</tool_call> then", TOOLS)
    assert reply.calls == [] and reply.content == "so  then"
    assert len(reply.malformed) == 1 and problem in reply.malformed[0]


def test_an_unclosed_call_is_malformed_and_cut_from_the_content():
    reply = parse_tool_calls('answer <tool_call>{"name": "calculator"', TOOLS)
    assert reply.content == "answer" and reply.calls == []
    assert reply.malformed == ["a <tool_call> without its </tool_call>"]


@given(st.text(max_size=30).filter(lambda s: "<tool_call>" not in s and "</tool_call>" not in s),
       st.lists(st.tuples(st.sampled_from(sorted(TOOLS)),
                          st.dictionaries(st.text(min_size=1, max_size=5), st.integers() | st.text(max_size=8),
                                          max_size=3)), max_size=3))
def test_what_the_renderer_writes_the_parser_reads_back(content, calls):
    text = render_reply(content, [{"function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls])
    reply = parse_tool_calls(text, TOOLS)
    assert reply.content == content.strip() and reply.malformed == []
    assert [(c.name, c.parsed_arguments()) for c in reply.calls] == calls


def test_the_tools_block_lists_each_schema_on_its_own_line():
    block = render_tools([Calculator.schema, PythonTool.schema])
    lines = block.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in lines] == ["calculator", "python"]
    # the instructions show the call in the format the parser reads
    example = block.split("To call one, write\n")[1].replace("<tool name>", '"calculator"').replace(
        "<a JSON object>", '{"expression": "2"}')
    assert example == render_tool_call("calculator", {"expression": "2"})


@pytest.mark.parametrize("expression, value", [
    ("37 * 41", "1517"), ("1/3 + 1/6", "1/2"), ("0.1 + 0.2", "3/10"), ("-(3 - 5) * 2", "4"), ("2 ** 10", "1024"),
    ("7 % 3", "1"), ("123456789 * 987654321", "121932631112635269"), ("2 ** -2", "1/4"),
])
def test_the_calculator_is_exact(expression, value):
    assert Calculator()({"expression": expression}) == value


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os').system('true')", "only numbers"), ("abs(3)", "only numbers"), ("x + 1", "only numbers"),
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("2 ** 0.5", "exponents must be integers"),
    ("9 ** 9 ** 9", "exponents must be integers"), ("(2 ** 500) ** 500", "more than 2000 digits"),
    ("1 +", "cannot read"), ("", "non-empty string"),
])
def test_the_calculator_refuses_what_is_not_small_exact_arithmetic(expression, problem):
    with pytest.raises(ToolError, match=problem):
        Calculator()({"expression": expression})


@pytest.fixture(scope="module")
def sandbox():
    box = CodeSandbox(slots=1, limits=SandboxLimits(wall_s=3.0, cpu_s=3))
    yield box
    box.close()


def test_the_python_tool_answers_with_output_or_what_went_wrong(sandbox):
    tool = PythonTool(sandbox)
    assert tool({"code": "print(6 * 7)"}) == "42\n"
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        tool({"code": "1 / 0"})
    with pytest.raises(ToolError, match="ran past 3 s"):
        tool({"code": "while True: pass"})


def test_the_toolbox_answers_every_call_and_counts_errors(sandbox):
    box = ToolBox([Calculator(), PythonTool(sandbox)])
    reply = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
                             '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
                             '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', set(box.tools))
    messages = box.respond(reply)
    assert [(m["tool_call_id"], m["content"]) for m in messages] == [
        ("call-0", "42"), ("call-1", "error: division by zero"),
        ("", "error: there is no tool 'nope' (tools: calculator, python)")]
    assert box.counts == {"tool_calculator_ok": 1, "tool_calculator_error": 1, "malformed_answered": 1}
