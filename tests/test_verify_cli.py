"""`areal-async verify`: one verdict per line with its reason, a summary line, and bad input named by line."""

import json

from areal_async.run.verify import verify_main

ADD_TEST = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add", "prompt": ""}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _verdicts(capsys):
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {v["id"]: v for v in lines if "id" in v}, lines[-1]


def test_code_verdicts_in_every_test_format(tmp_path, capsys):
    rows = [
        {"id": "humaneval", "response": "```python\ndef add(a, b):\n    return a + b\n```", **ADD_TEST},
        {"id": "humaneval-wrong", "response": "```python\ndef add(a, b):\n    return a\n```", **ADD_TEST},
        {"task_id": 7, "response": "```python\ndef double(x):\n    return 2 * x\n```",
         "test_list": ["assert double(2) == 4", "assert double(0) == 0", "assert double(-1) == -3"]},
        {"id": "stdio", "response": "```python\nprint(int(input()) + 1)\n```",
         "input_output": json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})},
        {"id": "call", "response": "```python\ndef f(a):\n    return a * a\n```",
         "input_output": {"inputs": [[3]], "outputs": [9], "fn_name": "f"}},
        {"id": "prose", "response": "the answer is 5", **ADD_TEST},
    ]
    assert verify_main([str(_write(tmp_path / "code.jsonl", rows)), "--kind", "code"]) == 0
    verdicts, summary = _verdicts(capsys)
    assert {key: (v["reward"], v["reason"]) for key, v in verdicts.items()} == {
        "humaneval": (5.0, "passed"), "humaneval-wrong": (-5.0, "wrong_output"), "7": (-5.0, "wrong_output"),
        "stdio": (5.0, "passed"), "call": (5.0, "passed"), "prose": (-5.0, "runtime_error")}
    assert verdicts["7"]["passed"] == 2 and verdicts["7"]["total"] == 3
    assert summary["summary"] and summary["responses"] == 6 and summary["reasons"]["passed"] == 3


def test_math_verdicts_and_the_file_output(tmp_path, capsys):
    rows = [{"id": "half", "response": "so \\boxed{\\frac{1}{2}}", "answer": "0.5"},
            {"id": "three", "response": "\\boxed{3}", "solutions": ["4", "5"]},
            {"id": "number", "response": "\\boxed{27}", "answer": 27.0}]
    out = tmp_path / "verdicts.jsonl"
    assert verify_main([str(_write(tmp_path / "math.jsonl", rows)), "--kind", "math", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["responses"] == 3  # the summary on stdout
    verdicts = {v["id"]: v for v in map(json.loads, out.read_text().splitlines()) if "id" in v}
    assert {key: v["reason"] for key, v in verdicts.items()} == {"half": "correct", "three": "wrong", "number": "correct"}


def test_bad_input_is_named_by_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "x", "answer": "1"}\n\n{not json\n')
    assert verify_main([str(bad), "--kind", "math"]) == 2
    assert f"{bad}:3: not JSON" in capsys.readouterr().err
    assert verify_main([str(_write(tmp_path / "notests.jsonl", [{"response": "x"}])), "--kind", "code"]) == 2
    assert "notests.jsonl:1: no tests" in capsys.readouterr().err
    assert verify_main([str(tmp_path / "missing.jsonl"), "--kind", "code"]) == 2
    assert "no such file" in capsys.readouterr().err
