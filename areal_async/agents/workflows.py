"""The shipped agent workflows, and what a workflow is built with.

A workflow is any class whose instances have `async def run(self, data: dict, client) -> float | dict[str, float]`
(areal_async.contracts.Workflow), built as `cls(context)` with a `WorkflowContext`. `rollout.workflow` names it by
import path ("my_pkg.agents:Solver"). `data` holds one sample of one prompt group:

    prompt (the templated prompt text), prompt_tokens (its ids), solutions (the reference answers or tests),
    query_id, group_id, sample_index, max_tokens (the sample's token limit, or None for the run's default)

`client` is the episode's OpenAI-shaped client (actors/agent_runtime.py), backed by the run's engine.

- `SingleTurnMath`: one completion of the prompt, judged: what every run did before workflows existed, with the
  same tokens, seeds and rewards.
- `ToolIntegratedReasoning`: a chat in which the model may call the context's tools before it answers.
- `MultiTurnRetry`: a wrong answer gets a fixed feedback turn, up to `max_attempts` answers; a later answer's
  reward is discounted.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from areal_async.agents.tools import Tool, ToolBox
from areal_async.agents.tool_calls import ParsedReply, ToolCall


@dataclass
class WorkflowContext:
    """What a run gives its workflow. judge(response, solutions) -> a Verdict of the run's verifier (batched
    with the other episodes' judgements); correct_reward / incorrect_reward: the verifier's rewards; tools: the
    run's tools (`rollout.agent.tools`); max_attempts and discount: the multi-turn retry's settings; counts: where
    a workflow's tools count their calls by outcome (the run reports it per step)."""

    judge: Callable[[str, Sequence[str]], Awaitable]
    correct_reward: float
    incorrect_reward: float
    tools: list[Tool] = field(default_factory=list)
    max_attempts: int = 3
    discount: float = 0.9
    counts: Counter = field(default_factory=Counter)

    async def reward(self, response: str, solutions: Sequence[str]) -> float:
        """The verifier's reward for `response` (NaN when it could not judge it: the learner leaves it out)."""
        verdict = await self.judge(response, solutions)
        return verdict.reward(self.correct_reward, self.incorrect_reward) if verdict.scored else math.nan


class SingleTurnMath:
    def __init__(self, context: WorkflowContext) -> None:
        self.context = context

    async def run(self, data: dict, client) -> float:
        completion = await client.completions.create(prompt=data["prompt_tokens"], max_tokens=data["max_tokens"])
        return await self.context.reward(completion.choices[0].text, data["solutions"])


class ToolIntegratedReasoning:
    """The problem as a user message, the tools in the system message; each reply's tool calls are answered with
    tool messages (malformed ones too, saying what was wrong) until a reply calls none, which is judged."""

    def __init__(self, context: WorkflowContext) -> None:
        self.context = context
        self.toolbox = ToolBox(context.tools, context.counts)

    async def run(self, data: dict, client) -> float:
        messages = [{"role": "user", "content": data["prompt"]}]
        while True:
            completion = await client.chat.completions.create(messages=messages, tools=self.toolbox.schemas,
                                                              max_tokens=data["max_tokens"])
            message = completion.choices[0].message
            messages.append(assistant_message(message))
            if not message.tool_calls and not message.malformed_tool_calls:
                return await self.context.reward(message.content, data["solutions"])
            messages += await _answered(self.toolbox, message)


class MultiTurnRetry:
    """Up to `context.max_attempts` answers to the problem: after a wrong one the user says so (a fixed
    message) and the model tries again. The k-th answer's reward counts discount^(k-1)."""

    FEEDBACK = "That answer is not correct. Check your work and try again."

    def __init__(self, context: WorkflowContext) -> None:
        self.context = context

    async def run(self, data: dict, client) -> float:
        messages = [{"role": "user", "content": data["prompt"]}]
        reward = self.context.incorrect_reward
        for attempt in range(self.context.max_attempts):
            completion = await client.chat.completions.create(messages=messages, max_tokens=data["max_tokens"])
            message = completion.choices[0].message
            reward = await self.context.reward(message.content, data["solutions"])
            if math.isnan(reward) or reward >= self.context.correct_reward:
                return reward * self.context.discount**attempt
            messages += [assistant_message(message), {"role": "user", "content": self.FEEDBACK}]
        return reward


def assistant_message(message) -> dict:
    """A client reply as the message to pass back in the history."""
    calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in message.tool_calls or []]
    return {"role": "assistant", "content": message.content, "tool_calls": calls or None}


async def _answered(toolbox: ToolBox, message) -> list[dict]:
    """The tool messages for a reply's calls, the tools run in a thread (the sandbox blocks)."""
    reply = ParsedReply(message.content, [ToolCall(c.id, c.function.name, c.function.arguments)
                                          for c in message.tool_calls or []], list(message.malformed_tool_calls))
    return await asyncio.to_thread(toolbox.respond, reply)
