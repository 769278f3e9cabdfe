"""Rule-based reward for math answers: extraction, Qwen2.5-Math-style equivalence, and a sandbox.

Model output is untrusted: equivalence never evaluates text as Python (a whitelisting parser
builds sympy objects) and every check runs in worker processes with a timeout and memory cap.
"""

from areal_async.reward.extraction import EXTRACT_MODES, extract_answer
from areal_async.reward.sandbox import SandboxError, Verdict
from areal_async.reward.verifier import RewardVerifier, is_equivalent, math_reward

__all__ = [
    "EXTRACT_MODES",
    "RewardVerifier",
    "SandboxError",
    "Verdict",
    "extract_answer",
    "is_equivalent",
    "math_reward",
]
