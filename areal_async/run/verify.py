"""`areal-async verify`: the reward of each response in a JSONL file, with its reason: the tool for a reward that
looks wrong.

Each input line is a JSON object with a `response` and the problem's tests (`--kind code`: HumanEval's `test` and
`entry_point` (and `prompt`), MBPP's `test_list` (and `test_imports`), or AReaL's `input_output`) or its gold
answers (`--kind math`: `answer`, `solution` or `solutions`, as the training data has them). An `id`, `task_id` or
`query_id` names the line in the verdicts (else its line number). Prints one JSON verdict per line (id, reward,
reason, seconds), then a summary line, to stdout or `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from areal_async.errors import InputError

ID_KEYS = ("id", "task_id", "query_id")
ANSWER_KEYS = ("answer", "solution", "solutions")


def read_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; InputError naming the file and line otherwise."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise InputError(f"{path}:{number}: needs a JSON object with a string 'response'")
        rows.append((number, row))
    return rows


def line_id(number: int, row: dict) -> str:
    return next((str(row[key]) for key in ID_KEYS if key in row), str(number))


def gold_answers(path: Path, number: int, row: dict) -> list[str]:
    key = next((key for key in ANSWER_KEYS if key in row), None)
    if key is None:
        raise InputError(f"{path}:{number}: --kind math needs one of {', '.join(ANSWER_KEYS)}")
    value = row[key]
    answers = value if isinstance(value, list) else [value]
    if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
        raise InputError(f"{path}:{number}: key {key!r} must be a string, a number or a list of strings")
    return [str(a) for a in answers]


def verify_math(path: Path, rows: list[tuple[int, dict]], workers: int, timeout_s: float) -> list[dict]:
    from areal_async.reward.verifier import RewardVerifier

    golds = [gold_answers(path, number, row) for number, row in rows]
    verifier = RewardVerifier(num_workers=workers, timeout_s=timeout_s)
    try:
        verdicts = []
        for (number, row), answers in zip(rows, golds):
            started = time.perf_counter()
            (verdict,) = verifier.verify_batch([row["response"]], [answers])
            reason = verdict.failure or ("correct" if verdict.value else "wrong")
            reward = verifier.correct_reward if verdict.value else verifier.incorrect_reward
            verdicts.append({"id": line_id(number, row), "reward": reward, "reason": reason,
                             "seconds": round(time.perf_counter() - started, 4)})
        return verdicts
    finally:
        verifier.close()


def verify_code(path: Path, rows: list[tuple[int, dict]], workers: int, timeout_s: float) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from areal_async.reward.code_reward import code_reward
    from areal_async.reward.code_verifier import CodeVerifier

    def one(entry: tuple[int, dict]) -> dict:
        number, row = entry
        started = time.perf_counter()
        try:
            verdict = verifier.judge(row["response"], row)
        except (ValueError, TypeError) as error:
            raise InputError(f"{path}:{number}: {error}") from None
        return {"id": line_id(number, row), "reward": code_reward(verdict), "reason": verdict.reason,
                "passed": verdict.passed, "total": verdict.total, "seconds": round(time.perf_counter() - started, 4)}

    with CodeVerifier(num_workers=workers, timeout_s=timeout_s) as verifier, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, rows))


def verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-async verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="JSONL: one response and its tests or gold answers per line")
    parser.add_argument("--kind", choices=["code", "math"], required=True, help="what the responses answer")
    parser.add_argument("--out", type=Path, help="write the verdicts here instead of stdout")
    parser.add_argument("--workers", type=int, default=2, help="concurrent verifications (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=10.0,
                        help="per response: wall-clock limit of its program (code) or of its check (math)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        rows = read_lines(args.file)
        verify = verify_code if args.kind == "code" else verify_math
        verdicts = verify(args.file, rows, max(1, args.workers), args.timeout_s)
    except InputError as error:
        print(f"areal-async verify: {error}", file=sys.stderr)
        return 2
    rewards = [v["reward"] for v in verdicts]
    summary = {"summary": True, "responses": len(verdicts), "reasons": dict(Counter(v["reason"] for v in verdicts)),
               "reward_mean": sum(rewards) / len(rewards) if rewards else None,
               "seconds": round(time.perf_counter() - started, 3)}
    text = "".join(json.dumps(v) + "\n" for v in [*verdicts, summary])
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(json.dumps(summary))
    else:
        sys.stdout.write(text)
    return 0
