"""Code problems in a run: the loader's records carry their tests, the code verifier scores responses by them,
and a run trains on them (reward.kind=code)."""

import json

import pytest

from areal_async.config import RewardConfig, RewardKind
from areal_async.data import load_code_jsonl
from areal_async.data.records import DatasetError
from areal_async.reward import build_verifier
from areal_async.reward.code_verifier import CodeVerifier, encoded_tests

HUMANEVAL = {"task_id": "HumanEval/x", "prompt": "def add(a, b):\n    \"\"\"The sum.\"\"\"\n", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "canonical_solution": "    return a + b\n"}
MBPP = {"task_id": 9, "prompt": "Write a function that doubles a number.", "code": "def double(x):\n    return 2 * x",
        "test_imports": [], "test_list": ["assert double(2) == 4", "assert double(5) == 10"]}
AREAL = {"query_id": "io-1", "question": "Read two numbers and print their product.",
         "input_output": json.dumps({"inputs": ["2 3\n"], "outputs": ["6\n"]})}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_code_problems_load_with_their_tests(tmp_path):
    records = load_code_jsonl(_write(tmp_path / "code.jsonl", [HUMANEVAL, MBPP, AREAL]))
    assert [r.query_id for r in records] == ["HumanEval/x", "9", "io-1"] and {r.task for r in records} == {"code"}
    assert "```python\ndef add(a, b):" in records[0].prompt
    assert "Your code should pass this test:\nassert double(2) == 4" in records[1].prompt
    assert records[2].prompt.startswith("Read two numbers")
    assert json.loads(records[1].solutions[0])["test_list"] == MBPP["test_list"]
    assert "canonical_solution" not in json.loads(records[0].solutions[0])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: no tests"):
        load_code_jsonl(_write(tmp_path / "bad.jsonl", [{"task_id": 1, "prompt": "no tests here"}]))


def test_the_code_verifier_scores_by_the_tests():
    verifier = build_verifier(RewardConfig(kind=RewardKind.code, num_workers=2, timeout_s=3.0))
    assert isinstance(verifier, CodeVerifier)
    with verifier:
        responses = ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a\n```",
                     "```python\ndef double(x):\n    return x + x\n```", "no code", "```python\nprint(6)\n```"]
        specs = [[encoded_tests(HUMANEVAL)], [encoded_tests(HUMANEVAL)], [encoded_tests(MBPP)], [encoded_tests(MBPP)],
                 [encoded_tests(AREAL)]]
        assert verifier.check_batch(responses, specs) == [True, False, True, False, True]
        (broken,) = verifier.verify_batch(["```python\nx = 1\n```"], [["not json"]])
        assert (broken.value, broken.failure) == (False, "error:JSONDecodeError") and not broken.scored
        assert verifier.failures["error:JSONDecodeError"] == 1


def test_a_run_trains_on_code_problems(tmp_path):
    from areal_async.run.cli import compose_config
    from areal_async.run.trainer import run_training

    rows = [{"task_id": f"t{i}", "prompt": f"Write a function that adds {i}.", "code": f"def f(x):\n    return x + {i}",
             "test_list": [f"assert f(1) == {1 + i}"]} for i in range(12)]
    data = _write(tmp_path / "train.jsonl", rows)
    config = compose_config("train", [
        "data.kind=code_jsonl", f"data.path={data}", "data.num_heldout=4", "reward.kind=code", "reward.timeout_s=3",
        "total_steps=2", "rollout.groups_per_step=2", "rollout.groups_per_request=2", "generation.group_size=2",
        "generation.max_new_tokens=8", "eval.num_samples=1", f"output_dir={tmp_path}", "run_name=code",
        "checkpoint_every=0", "ppo.filter_zero_variance_groups=false"])
    summary = run_training(config, show_progress=False)
    assert summary["ledger_balanced"] and summary["version"] == 2
    records = [json.loads(line) for line in (tmp_path / "code" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_mean"] == -5.0 for r in records)  # the tiny model writes no program: every test fails
    with pytest.raises(ValueError, match="reward.kind=code"):
        run_training(compose_config("train", ["data.kind=code_jsonl", f"data.path={data}", f"output_dir={tmp_path}",
                                              "run_name=mismatch"]), show_progress=False)


def test_code_benchmarks_load_and_evaluate_with_the_code_verifier(tmp_path):
    from evaluation import EvalSettings, evaluate, load_benchmarks

    path = _write(tmp_path / "he.jsonl", [HUMANEVAL, {**HUMANEVAL, "task_id": "HumanEval/y"}])
    (benchmark,) = load_benchmarks([f"humaneval={path}"])
    assert benchmark.spec.task == "code" and benchmark.problems[0].problem_id == "HumanEval/x"
    assert "Complete the following Python function" in benchmark.problems[0].text

    class Engine:  # answers every prompt with the right function, then a wrong one
        def generate(self, prompts, params):
            from types import SimpleNamespace
            bodies = ["return a + b", "return a - b"]
            return [SimpleNamespace(tokens=list(f"```python\ndef add(a, b):\n    {bodies[i % 2]}\n```".encode()),
                                    finish_reason="stop") for i in range(len(prompts))]

    class Tokenizer:
        eos_token_id = None

        def encode(self, text, add_special_tokens=True):
            return list(text.encode())

        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode()

    with CodeVerifier(num_workers=2, timeout_s=3.0) as verifier:
        settings = EvalSettings(num_samples=2, temperature=1.0, max_gen_tokens=64, prompt_type="none", batch_size=4)
        summary = evaluate(Engine(), Tokenizer(), {"code": verifier}, [benchmark], settings)["humaneval"]
    assert summary["pass@1"] == 0.5 and summary["pass@k"]["2"] == 1.0
    with pytest.raises(ValueError, match="needs a code verifier"):
        evaluate(Engine(), Tokenizer(), {"math": verifier}, [benchmark], settings)


def test_the_synthetic_coding_task_checks_every_input():
    import random

    from areal_async.data.synthetic_code import code_demonstration, code_table_problems, table_of

    train, heldout = code_table_problems(300, seed=0, held_out=False), code_table_problems(30, seed=0, held_out=True)
    assert not {r.prompt for r in train} & {r.prompt for r in heldout}
    record = train[0]
    slope, offset = table_of(record)
    assert record.prompt.endswith("\ndef f(x): return ") and record.prompt.count("=") == 3
    assert code_demonstration(record, random.Random(0), error_rate=0.0) == f"{slope}*x+{offset}"
    shown = {int(pair[2]): int(pair.split("=")[1]) for pair in record.prompt.split("\n")[0].split()}
    lookup = "{" + ", ".join(f"{x}: {y}" for x, y in shown.items()) + "}[x]"  # right on the shown inputs only
    with CodeVerifier(num_workers=2, timeout_s=3.0) as verifier:
        right, lookup_only, slipped = verifier.check_batch(
            [f"{slope}*x+{offset}", lookup, f"{slope}*x+{offset + 1}"], [record.solutions] * 3)
    assert (right, lookup_only, slipped) == (True, False, False)


def test_partial_credit_rewards_the_share_of_tests_passed():
    verifier = build_verifier(RewardConfig(kind=RewardKind.code, num_workers=2, timeout_s=3.0, partial_credit=True))
    with verifier:
        half = "```python\ndef double(x):\n    return 4 if x == 2 else 0\n```"  # double(2) right, double(5) wrong
        whole = "```python\ndef double(x):\n    return 2 * x\n```"
        verdicts = verifier.verify_batch([half, whole], [[encoded_tests(MBPP)]] * 2)
    assert [(v.value, v.credit) for v in verdicts] == [(False, 0.5), (True, 1.0)]
    assert [v.reward(5.0, -5.0) for v in verdicts] == [0.0, 5.0]
