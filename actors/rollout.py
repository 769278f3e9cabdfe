"""Rollout: generate G samples per admitted prompt group, score them, and deliver them to the replay queue."""

from __future__ import annotations

import math
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from actors.sampling import long_tailed_limit
from areal_async.contracts import GenerationEngine
from areal_async.types import PromptGroup, SamplingParams, Trajectory
from areal_async.config import GenerationConfig
from areal_async.wire import encode_group

QUEUE_FULL_BACKOFF_S = 0.05


class WeightUpdate(Protocol):
    """Joins the publish round of a newer version if there is one (called at token boundaries, where it may be
    throttled; `force` asks now). Returns whether the weights changed."""

    def __call__(self, force: bool = False) -> bool: ...


class RolloutWorker:
    """Turns prompt groups into scored trajectories with one engine and one reward verifier.

    `verifier` is a RewardVerifier (`verify_batch(responses, gold_answers) -> verdicts`, `correct_reward`,
    `incorrect_reward`); `decode` maps output token ids to text (the tokenizer's decode without special
    tokens). `last_round` holds the reward failures (verdicts that could not be computed, by reason) and the
    generation and reward seconds of the last `rollout`. `worker_id` names the worker to the controller, which
    knows which groups a dead worker held.
    """

    def __init__(self, engine: GenerationEngine, decode, verifier, stop_token_ids: Sequence[int],
                 worker_id: int | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.decode = decode
        self.verifier = verifier
        self.stop_token_ids = tuple(stop_token_ids)
        self.last_round: dict = {}

    def rollout(
        self,
        groups: Sequence[PromptGroup],
        generation: GenerationConfig,
        seed: int | None = None,
        temperature: float | None = None,
        weight_update: WeightUpdate | None = None,
    ) -> list[Trajectory]:
        """G samples for every group (temperature overrides generation.temperature, e.g. for evaluation)."""
        params = SamplingParams(
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature if temperature is None else temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
            stop_token_ids=self.stop_token_ids,
            seed=seed,
        )
        started = time.perf_counter()
        requests = [(group, index) for group in groups for index in range(group.group_size)]
        limits = None
        if generation.simulated_length_mean is not None:
            limits = [long_tailed_limit(generation.simulated_length_mean, min(16, generation.max_new_tokens),
                                        generation.max_new_tokens, f"{seed}:{group.group_id}:{index}")
                      for group, index in requests]
        generations = self.engine.generate([group.prompt_tokens for group, _ in requests], params, weight_update,
                                           max_new_tokens=limits)
        generated = time.perf_counter()
        texts = [self.decode(g.tokens) for g in generations]
        verdicts = self.verifier.verify_batch(texts, [list(group.solutions) for group, _ in requests])
        # an answer the verifier could not judge gets no reward (NaN): the learner leaves it out, its group keeps
        # the others; scoring it wrong would push against the long answers that time out
        rewards = [v.reward(self.verifier.correct_reward, self.verifier.incorrect_reward) if v.scored else math.nan
                   for v in verdicts]
        timings = {"generate_s": generated - started, "reward_s": time.perf_counter() - generated}
        self.last_round = {**timings, "reward_failures": Counter(v.failure for v in verdicts if v.failure)}
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

    def solved(self, group: list[Trajectory]) -> float | None:
        """The fraction of the group's scored answers that were correct (None: the verifier judged none)."""
        scored = [t.reward for t in group if not math.isnan(t.reward)]
        return sum(r == self.verifier.correct_reward for r in scored) / len(scored) if scored else None

    def produce(
        self,
        controller,
        queue,
        generation: GenerationConfig,
        max_groups: int,
        seed: int,
        weight_update: WeightUpdate | None = None,
        wait_when_full: bool = True,
    ) -> dict[str, float]:
        """One round: admit up to `max_groups` groups, generate and score them, deliver one frame per group.

        `controller` offers admit_groups / delivered / readmit / report_generation, `queue` offers put(group_id,
        frame) -> outcome (local objects or Ray proxies alike). If generation raises, the groups go back to
        the controller to be handed out again, with the error and its traceback. Returns counts and timings of
        the round, which it also reports to the controller (`report_generation`).
        """
        groups = controller.admit_groups(max_groups, worker=self.worker_id)
        if not groups:
            return {"groups": 0, "tokens": 0, "generate_s": 0.0, "reward_s": 0.0, "errors": 0}
        if weight_update is not None and max(g.admitted_at_version for g in groups) > self.engine.version:
            weight_update(force=True)  # admitted for a version this engine lacks: take it before the first token
        try:
            trajectories = self.rollout(groups, generation, seed=seed, weight_update=weight_update)
        except Exception as error:  # noqa: BLE001 - any engine failure must not lose the groups
            controller.readmit(groups, f"{type(error).__name__}: {error}", traceback.format_exc())
            return {"groups": 0, "tokens": 0, "generate_s": 0.0, "reward_s": 0.0, "errors": 1}
        by_group: dict[str, list[Trajectory]] = {}
        for trajectory in trajectories:
            by_group.setdefault(trajectory.group_id, []).append(trajectory)
        for group in groups:
            frame = encode_group(by_group[group.group_id])
            while (outcome := queue.put(group.group_id, frame)) == "full":
                if not wait_when_full:
                    raise RuntimeError("the replay queue is full and nothing else will drain it: raise "
                                       "rollout.queue_capacity_per_shard")
                if weight_update is not None:
                    weight_update()
                time.sleep(QUEUE_FULL_BACKOFF_S)
            controller.delivered(group.group_id, dropped=outcome != "queued", solved=self.solved(by_group[group.group_id]))
        result = {
            "groups": len(groups),
            "tokens": sum(len(t.output_tokens) for t in trajectories),
            "generate_s": self.last_round["generate_s"],
            "reward_s": self.last_round["reward_s"],
            "errors": 0,
        }
        rewards = [t.reward for t in trajectories if not math.isnan(t.reward)]  # NaN: the verifier could not judge
        controller.report_generation(result["tokens"], result["generate_s"], result["reward_s"],
                                     dict(self.last_round["reward_failures"]), sum(rewards), len(rewards))
        return result
