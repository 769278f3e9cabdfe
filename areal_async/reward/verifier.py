"""Sandboxed reward scoring: :class:`RewardVerifier` and the module-level shortcuts.

Everything that touches model text beyond answer extraction (normalization, parsing, sympy)
runs in the verifier's worker pool, so a hostile answer costs at most the timeout.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

from areal_async.config import Conventions
from areal_async.reward.extraction import EXTRACT_MODES
from areal_async.reward.sandbox import SandboxPool, Verdict

DEFAULT_CORRECT_REWARD = 5.0
DEFAULT_INCORRECT_REWARD = -5.0


class RewardVerifier:
    """Scores responses against gold answers in a pool of sandboxed worker processes.

    Args:
        num_workers: Worker processes; a batch is spread over all of them.
        timeout_s: Wall-clock limit for one response (extraction and all gold comparisons);
            a worker that overruns it is killed and replaced, and the response scores incorrect (counted in
            `failures` as "timeout", apart from incorrect answers).
        memory_limit_mb: Address-space cap of each worker (a clean process that imports only the verifier);
            a cap under which a worker cannot verify a trivial equivalence fails construction with the cause.
        correct_reward, incorrect_reward: What :meth:`score` returns.
        extract_mode: How the answer is taken from a response (see ``extract_answer``).
        conventions: The choices graders make differently (see ``Conventions``).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 1024,
        correct_reward: float = DEFAULT_CORRECT_REWARD,
        incorrect_reward: float = DEFAULT_INCORRECT_REWARD,
        extract_mode: str = "auto",
        conventions: Conventions | None = None,
    ) -> None:
        if extract_mode not in EXTRACT_MODES:
            raise ValueError(f"extract mode {extract_mode!r} is not one of {EXTRACT_MODES}")
        self.correct_reward = correct_reward
        self.incorrect_reward = incorrect_reward
        self.extract_mode = extract_mode
        self.conventions = asdict(conventions or Conventions())  # as it travels to the workers
        self._pool = SandboxPool(num_workers, timeout_s, memory_limit_mb)
        self.failures: Counter = Counter()  # verdicts that could not be computed, by reason, since construction

    @classmethod
    def from_config(cls, reward, num_workers: int | None = None) -> "RewardVerifier":
        """From a RewardConfig (`num_workers` overrides its pool size)."""
        return cls(
            num_workers=reward.num_workers if num_workers is None else num_workers,
            timeout_s=reward.timeout_s,
            memory_limit_mb=reward.memory_limit_mb,
            correct_reward=reward.correct_reward,
            incorrect_reward=reward.incorrect_reward,
            extract_mode=reward.extract_mode.value,
            conventions=reward.conventions,
        )

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def verify_batch(self, responses: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> list[Verdict]:
        """Per response, in input order: whether its answer equals one of its gold answers, and the failure
        (timeout, out of memory, ...) when no verdict could be computed (the value is then False)."""
        if len(responses) != len(gold_answers):
            raise ValueError(f"{len(responses)} responses but {len(gold_answers)} gold answer lists")
        tasks = [
            ("score", (str(response), _gold_strings(golds), self.extract_mode, self.conventions))
            for response, golds in zip(responses, gold_answers)
        ]
        verdicts = self._pool.run(tasks)
        self.failures.update(v.failure for v in verdicts if v.failure is not None)
        return verdicts

    def check_batch(self, responses: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> list[bool]:
        """Whether each response's answer equals one of its gold answers, in input order."""
        return [verdict.value for verdict in self.verify_batch(responses, gold_answers)]

    def score(self, response: str, gold_answers: Sequence[str]) -> float:
        """The reward of one response."""
        return self.score_batch([response], [gold_answers])[0]

    def score_batch(self, responses: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> list[float]:
        """Rewards of many responses, scored in parallel, in input order."""
        return [
            self.correct_reward if correct else self.incorrect_reward
            for correct in self.check_batch(responses, gold_answers)
        ]

    def is_equivalent(self, prediction: str, gold: str) -> bool:
        """Whether two final answers are equivalent, decided inside the sandbox."""
        if prediction is None or gold is None:
            return False
        return self._pool.run([("equivalent", (str(prediction), str(gold), self.conventions))])[0].value

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        self._pool.close()

    def __enter__(self) -> RewardVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run_debug_tasks(self, kinds: list[str], payload: object = None) -> list[Verdict]:
        """Test hook: run worker task kinds such as ``_debug_hang`` and ``_debug_crash``."""
        return self._pool.run([(kind, payload) for kind in kinds])


def _gold_strings(gold_answers: Sequence[str] | str) -> list[str]:
    """Gold answers as strings; a lone string (a common slip) counts as a one-answer list."""
    if isinstance(gold_answers, str):
        return [gold_answers]
    return [str(gold) for gold in gold_answers]


_default_verifier: RewardVerifier | None = None
_default_verifier_lock = threading.Lock()


def _get_default_verifier() -> RewardVerifier:
    """The shared verifier behind :func:`is_equivalent` and :func:`math_reward`, created on first use."""
    global _default_verifier
    with _default_verifier_lock:
        if _default_verifier is None or _default_verifier.closed:
            _default_verifier = RewardVerifier()
        return _default_verifier


def is_equivalent(prediction: str, gold: str) -> bool:
    """Whether ``prediction`` and ``gold`` denote the same answer (Qwen2.5-Math ``math_equal``
    semantics), decided in the default sandboxed verifier."""
    return _get_default_verifier().is_equivalent(prediction, gold)


def math_reward(
    response: str,
    gold_answers: Sequence[str],
    correct_reward: float = DEFAULT_CORRECT_REWARD,
    incorrect_reward: float = DEFAULT_INCORRECT_REWARD,
) -> float:
    """``correct_reward`` if the answer extracted from ``response`` equals any gold answer, else
    ``incorrect_reward``; scored in the default sandboxed verifier."""
    correct = _get_default_verifier().check_batch([response], [gold_answers])[0]
    return correct_reward if correct else incorrect_reward
