"""Rollout: generate G samples per admitted prompt group, score them, and return trajectories."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from actors.engine import TorchEngine
from actors.sampling import SamplingParams
from areal_async.types import PromptGroup, Trajectory


class RolloutWorker:
    """Turns prompt groups into scored trajectories with one engine and one reward verifier.

    `verifier` is anything with `score_batch(responses, gold_answers) -> list[float]`; `decode` maps output
    token ids to text (the tokenizer's decode without special tokens).
    """

    def __init__(self, engine: TorchEngine, decode, verifier, stop_token_ids: Sequence[int]) -> None:
        self.engine = engine
        self.decode = decode
        self.verifier = verifier
        self.stop_token_ids = tuple(stop_token_ids)

    def rollout(
        self, groups: Sequence[PromptGroup], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
        top_k: int = 0, seed: int | None = None,
    ) -> list[Trajectory]:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            stop_token_ids=self.stop_token_ids, seed=seed,
        )
        started = time.perf_counter()
        requests = [(group, index) for group in groups for index in range(group.group_size)]
        generations = self.engine.generate([group.prompt_tokens for group, _ in requests], params)
        generated = time.perf_counter()
        texts = [self.decode(g.tokens) for g in generations]
        rewards = self.verifier.score_batch(texts, [list(group.solutions) for group, _ in requests])
        scored = time.perf_counter()
        timings = {"generate_s": generated - started, "reward_s": scored - generated}
        return [
            Trajectory(
                query_id=group.query_id,
                group_id=group.group_id,
                sample_index=index,
                prompt_tokens=np.asarray(group.prompt_tokens, dtype=np.int32),
                output_tokens=np.asarray(generation.tokens, dtype=np.int32),
                behaviour_logprobs=np.asarray(generation.logprobs, dtype=np.float32),
                versions=np.asarray(generation.versions, dtype=np.int32),
                reward=float(reward),
                finish_reason=generation.finish_reason,
                timings=dict(timings),
            )
            for (group, index), generation, reward in zip(requests, generations, rewards)
        ]
