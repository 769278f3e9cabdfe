"""The reward verifier of code problems: RewardVerifier's interface over the code sandbox.

A code problem travels like a math one (PromptRecord.solutions, PromptGroup.solutions): its one "gold answer" is
`encoded_tests(problem)`, the JSON of its test fields in any format `code_verdict` reads (HumanEval, MBPP, AReaL's
`input_output`; an MBPP reference program is kept for its imports). `CodeVerifier.verify_batch` judges each
response by it: the value is whether every test passed. A program that fails, hangs or prints too much has a
verdict (wrong); only a judge that could not run (a malformed spec, an error here) is a failure, counted apart and
not trained on, as for math.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from areal_async.reward.code_reward import CodeVerdict
from areal_async.reward.code_sandbox import CodeSandbox, SandboxLimits
from areal_async.reward.code_tests import code_verdict
from areal_async.reward.sandbox import Verdict

TEST_FIELDS = ("test", "entry_point", "prompt", "test_list", "test_imports", "code", "input_output")


def encoded_tests(problem: dict) -> str:
    """The problem's test fields as JSON: the one gold answer of a code problem."""
    spec = {key: problem[key] for key in TEST_FIELDS if key in problem}
    if not ({"test", "entry_point"} <= set(spec) or "test_list" in spec or "input_output" in spec):
        raise ValueError("no tests: a code problem needs 'test' and 'entry_point' (HumanEval), 'test_list' (MBPP) "
                         "or 'input_output'")
    return json.dumps(spec)


class CodeVerifier:
    """`num_workers` sandbox slots; each program gets `timeout_s` of wall-clock time and its CPU seconds, and
    `memory_limit_mb` of address space. With `partial_credit` a verdict's credit is the share of tests passed (its
    reward lies between the two), else every test must pass (+correct) or the answer is wrong (AReaL's rule)."""

    extract_mode = "code"

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, memory_limit_mb: int = 1024,
                 correct_reward: float = 5.0, incorrect_reward: float = -5.0, partial_credit: bool = False) -> None:
        self.correct_reward, self.incorrect_reward = correct_reward, incorrect_reward
        self.partial_credit = partial_credit
        self.sandbox = CodeSandbox(slots=num_workers, limits=SandboxLimits.of(timeout_s, memory_limit_mb))
        self._threads = ThreadPoolExecutor(max_workers=num_workers)
        self.failures: Counter = Counter()
        self.closed = False

    @classmethod
    def from_config(cls, reward, num_workers: int | None = None) -> CodeVerifier:
        return cls(num_workers=reward.num_workers if num_workers is None else num_workers,
                   timeout_s=reward.timeout_s, memory_limit_mb=reward.memory_limit_mb,
                   correct_reward=reward.correct_reward, incorrect_reward=reward.incorrect_reward,
                   partial_credit=reward.partial_credit)

    def verify_batch(self, responses: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> list[Verdict]:
        """Per response, in input order: whether it passed every test of its problem (gold_answers[i][0], a
        `encoded_tests`)."""
        if len(responses) != len(gold_answers):
            raise ValueError(f"{len(responses)} responses but {len(gold_answers)} test specs")
        verdicts = list(self._threads.map(self._verify, responses, gold_answers))
        self.failures.update(v.failure for v in verdicts if v.failure is not None)
        return verdicts

    def judge(self, response: str, problem: dict) -> CodeVerdict:
        """The response judged by the problem's tests (any format `code_verdict` reads); ValueError for a problem
        without readable tests."""
        return code_verdict(str(response), problem, self.sandbox)

    def _verify(self, response: str, golds: Sequence[str]) -> Verdict:
        try:
            verdict = self.judge(response, json.loads(golds[0] if not isinstance(golds, str) else golds))
            credit = verdict.passed / max(1, verdict.total) if self.partial_credit else None
            return Verdict(verdict.all_passed, credit=credit)
        except Exception as error:  # noqa: BLE001 - a judge that could not run is a failure, not a wrong answer
            return Verdict(False, f"error:{type(error).__name__}")

    def check_batch(self, responses: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> list[bool]:
        return [verdict.value for verdict in self.verify_batch(responses, gold_answers)]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._threads.shutdown(wait=True)
            self.sandbox.close()

    def __enter__(self) -> CodeVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
