"""Rollout: run G episodes of the run's workflow per admitted prompt group (one completion of the prompt, judged,
unless the run names another), score them, and deliver them to the replay queue."""

from __future__ import annotations

import asyncio
import gc
import importlib
import math
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from actors.agent_runtime import EngineRequests, EpisodeLimits, JudgeRequests, judge, run_episodes
from actors.agent_server import AgentServer
from actors.sampling import long_tailed_limit
from areal_async.agents.chat import ChatTemplate, Conversation, TokenizerTemplate, role_template
from areal_async.agents.tools import Calculator, PythonTool
from areal_async.agents.workflows import SingleTurnMath, WorkflowContext
from areal_async.contracts import GenerationEngine
from areal_async.reward.code_sandbox import CodeSandbox, SandboxLimits
from areal_async.types import PromptGroup, SamplingParams, Trajectory
from areal_async.config import ChatTemplateKind, GenerationConfig, PromptType, ToolName, TrainConfig
from areal_async.actor_system.wire import encode_group

QUEUE_FULL_BACKOFF_S = 0.05


class WeightUpdate(Protocol):
    """Joins the publish round of a newer version if there is one (called at token boundaries, where it may be
    throttled; `force` asks now). Returns whether the weights changed."""

    def __call__(self, force: bool = False) -> bool: ...


class RolloutWorker:
    """Turns prompt groups into scored trajectories with one engine, one reward verifier and one workflow.

    `verifier` is a RewardVerifier (`verify_batch(responses, gold_answers) -> verdicts`, `correct_reward`,
    `incorrect_reward`); `decode` maps output token ids to text (the tokenizer's decode without special
    tokens). `workflow(context)` builds the agent workflow (areal_async/agents/workflows.py; default
    SingleTurnMath) with a WorkflowContext of this worker's verifier, `tools` and `retry` settings (max_attempts,
    discount); chat workflows need `tokenizer` and `chat_template`. `http_address` (host, port): each round serves
    every episode's client over HTTP too (actors/agent_server.py). `limits`: each episode's (an episode past
    one is scored as incorrect). `last_round` holds the reward failures (verdicts that could not be computed, by
    reason), the episodes' tool counts and end reasons, and the generation and reward seconds of the last
    `rollout`. `worker_id` names the worker to the controller, which knows which groups a dead worker held.
    """

    def __init__(self, engine: GenerationEngine, decode, verifier, stop_token_ids: Sequence[int],
                 worker_id: int | None = None, workflow: Callable = SingleTurnMath, tokenizer=None,
                 chat_template: ChatTemplate | None = None, limits: EpisodeLimits = EpisodeLimits(),
                 tools: Sequence = (), max_attempts: int = 3, discount: float = 0.9,
                 http_address: tuple[str, int] | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.decode = decode
        self.verifier = verifier
        self.stop_token_ids = tuple(stop_token_ids)
        self.tokenizer, self.chat_template, self.limits = tokenizer, chat_template, limits
        self.discount, self.http_address = discount, http_address
        self.tools = list(tools)
        self.workflow_counts: Counter = Counter()
        self.workflow = workflow(WorkflowContext(judge, verifier.correct_reward, verifier.incorrect_reward,
                                                 self.tools, max_attempts, discount, self.workflow_counts))
        self.last_round: dict = {}

    def close(self) -> None:
        """Stops the tools' sandboxes."""
        for tool in self.tools:
            if isinstance(tool, PythonTool):
                tool.sandbox.close()

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
        requests = [(group, index) for group in groups for index in range(group.group_size)]
        limits = [generation.max_new_tokens] * len(requests)
        if generation.simulated_length_mean is not None:
            limits = [long_tailed_limit(generation.simulated_length_mean, min(16, generation.max_new_tokens),
                                        generation.max_new_tokens, f"{seed}:{group.group_id}:{index}")
                      for group, index in requests]
        items = [{"prompt": group.prompt, "prompt_tokens": [int(t) for t in group.prompt_tokens],
                  "solutions": list(group.solutions), "query_id": group.query_id, "group_id": group.group_id,
                  "sample_index": index, "max_tokens": limit} for (group, index), limit in zip(requests, limits)]
        engine_requests, judge_requests = EngineRequests(self.engine, weight_update, seed), JudgeRequests(self.verifier)
        collecting = gc.isenabled()
        gc.disable()  # a round's thousands of small objects would set off collections of the whole heap (2/3 of its overhead)
        try:
            episodes = asyncio.run(run_episodes(
                self.workflow, items, lambda: Conversation(self.chat_template, self.tokenizer), engine_requests,
                judge_requests, params, self.limits, self.decode, self.verifier.incorrect_reward, self.discount,
                None if self.http_address is None else AgentServer(*self.http_address)))
        finally:
            if collecting:
                gc.enable()
        timings = {"generate_s": engine_requests.seconds, "reward_s": judge_requests.seconds}
        episode_counts = Counter()
        for episode in episodes:
            episode_counts.update(episode.counts)
        episode_counts.update(self.workflow_counts)  # the tools' outcomes (ToolBox), this round's
        self.workflow_counts.clear()
        self.last_round = {**timings, "reward_failures": judge_requests.failures, "episodes": episode_counts}
        trajectories = []
        for (group, index), episode in zip(requests, episodes):
            conversation, start = episode.conversation, episode.conversation.prompt_length
            trajectories.append(Trajectory(
                query_id=group.query_id,
                group_id=group.group_id,
                sample_index=index,
                prompt_tokens=np.asarray(conversation.tokens[:start] or group.prompt_tokens, dtype=np.int32),
                output_tokens=np.asarray(conversation.tokens[start:], dtype=np.int32),
                behaviour_logprobs=np.asarray(conversation.logprobs, dtype=np.float32),
                versions=np.asarray(conversation.versions, dtype=np.int32),
                reward=float(episode.reward),
                finish_reason=episode.finish_reason,
                timings=dict(timings),
                loss_mask=np.asarray(conversation.mask, dtype=np.uint8),
            ))
        return trajectories

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
                                     dict(self.last_round["reward_failures"]), sum(rewards), len(rewards),
                                     dict(self.last_round["episodes"]))
        return result


def load_workflow(path: str) -> Callable:
    """The workflow class at `path` ("package.module:Class"); a bad path is a one-line error naming the key."""
    module_name, _, class_name = path.partition(":")
    try:
        workflow = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"rollout.workflow: cannot load {path!r} (expected 'package.module:Class'): "
                         f"{type(error).__name__}: {error}") from None
    if not callable(getattr(workflow, "run", None)):
        raise ValueError(f"rollout.workflow: {path!r} has no run(data, client) method")
    return workflow


def build_rollout_worker(config: TrainConfig, engine: GenerationEngine, tokenizer, verifier,
                         worker_id: int | None = None) -> RolloutWorker:
    """The run's rollout worker: its workflow, tools, chat template and episode limits from `config`."""
    agent = config.rollout.agent
    tools = []
    for name in agent.tools:
        if name is ToolName.calculator:
            tools.append(Calculator())
        else:
            limits = SandboxLimits.of(config.reward.timeout_s, config.reward.memory_limit_mb)
            tools.append(PythonTool(CodeSandbox(slots=1, limits=limits)))
    if agent.chat_template is ChatTemplateKind.tokenizer:
        template = TokenizerTemplate(tokenizer)
    else:
        template = role_template(config.data.prompt_type or PromptType.boxed, tokenizer.eos_token or "")
    limits = EpisodeLimits(agent.max_turns, agent.max_tool_calls, agent.max_total_tokens, agent.max_wall_s)
    return RolloutWorker(engine, lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True), verifier,
                         [tokenizer.eos_token_id], worker_id=worker_id, workflow=load_workflow(config.rollout.workflow),
                         tokenizer=tokenizer, chat_template=template, limits=limits, tools=tools,
                         max_attempts=agent.max_attempts, discount=agent.discount,
                         http_address=(agent.http_host, agent.http_port) if agent.serve_http else None)
