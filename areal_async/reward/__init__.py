"""Rule-based rewards: math answers (extraction, Qwen2.5-Math-style equivalence, a sandbox) and code (tests run in
the code sandbox).

Model output is untrusted: equivalence never evaluates text as Python (a whitelisting parser
builds sympy objects) and every check runs in worker processes with a timeout and memory cap; model code runs
only in the code sandbox.
"""

from areal_async.reward.extraction import EXTRACT_MODES, extract_answer
from areal_async.reward.sandbox import SandboxError, Verdict
from areal_async.reward.verifier import RewardVerifier, is_equivalent, math_reward


def build_verifier(reward, num_workers: int | None = None):
    """The verifier of a RewardConfig's kind: RewardVerifier (math) or CodeVerifier (code), with one interface."""
    if reward.kind.value == "code":
        from areal_async.reward.code_verifier import CodeVerifier

        return CodeVerifier.from_config(reward, num_workers)
    return RewardVerifier.from_config(reward, num_workers)


__all__ = [
    "EXTRACT_MODES",
    "RewardVerifier",
    "SandboxError",
    "Verdict",
    "build_verifier",
    "extract_answer",
    "is_equivalent",
    "math_reward",
]
