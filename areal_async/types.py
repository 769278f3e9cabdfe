"""The data units that flow between the controller, rollout workers, the queue and the learner."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FINISH_REASONS = ("stop", "length", "aborted")


@dataclass
class Trajectory:
    """One sampled answer to one prompt.

    prompt_tokens: [P] int32; output_tokens, behaviour_logprobs, versions: [O] (int32, float32, int32):
    the logprob of each output token under the temperature-scaled sampling distribution and the policy
    version that produced it (an interrupted trajectory carries several versions).
    loss_mask: [O] uint8, 1 where the model sampled the token (trained on), 0 where a multi-turn episode put it
    in (a tool's or user's message and its template: no logprob, carried version of the model token before it);
    default all 1.
    """

    query_id: str
    group_id: str
    sample_index: int
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    behaviour_logprobs: np.ndarray
    versions: np.ndarray
    reward: float
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    loss_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.output_tokens)
        if self.loss_mask is None:
            self.loss_mask = np.ones(n, dtype=np.uint8)
        if len(self.behaviour_logprobs) != n or len(self.versions) != n or len(self.loss_mask) != n:
            raise ValueError(
                f"trajectory {self.group_id}/{self.sample_index}: output_tokens ({n}), behaviour_logprobs "
                f"({len(self.behaviour_logprobs)}), versions ({len(self.versions)}) and loss_mask "
                f"({len(self.loss_mask)}) must have equal length"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason {self.finish_reason!r} is not one of {FINISH_REASONS}")

    @property
    def oldest_version(self) -> int:
        return int(self.versions.min()) if len(self.versions) else -1

    @property
    def num_model_tokens(self) -> int:
        """Output tokens the model sampled (the ones trained on)."""
        return int(np.count_nonzero(self.loss_mask))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_tokens) + len(self.output_tokens)


@dataclass
class PromptGroup:
    """A prompt admitted for generation: G samples will be drawn for it."""

    group_id: str
    query_id: str
    prompt: str
    prompt_tokens: np.ndarray
    solutions: tuple[str, ...]
    group_size: int
    admitted_at_version: int


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy decoding; top_k = 0 and top_p = 1 disable truncation."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    """What the engine returns per request: output tokens with their behaviour logprobs and versions."""

    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" (a stop token, included in tokens) or "length"
