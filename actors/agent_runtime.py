"""Episodes of agent workflows over one batch engine: every episode is a coroutine (`Workflow.run(data, client)`),
and what they ask of the engine and the verifier is served in batches.

The rendezvous: an episode that asks for a completion or a judgement waits; when every live episode waits (or
`idle_s` passes with some waiting while others run tools in threads), each kind of request is served as one batch:
one `engine.generate` call per set of sampling settings, one `verify_batch` call. A single-turn workflow therefore
makes exactly one generate call and one verify call per round, as a plain rollout does.

`AgentClient` is the OpenAI-shaped client an episode gets: `client.chat.completions.create(messages=..., tools=...,
temperature=..., max_tokens=...)` and `client.completions.create(prompt=...)` (text or token ids). It records every
completion in the episode's `Conversation` (token-in/token-out: areal_async/agents/chat.py) and enforces the
episode's limits (`EpisodeLimits`): a request past one raises `EpisodeLimit`, which ends the episode with its reason.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

from areal_async.agents.chat import ChatTemplate, Conversation
from areal_async.agents.tool_calls import parse_tool_calls
from areal_async.types import Generation, SamplingParams

_SEED_STRIDE = 1_000_003  # a later round of one rollout draws from a seed of its own
_ROUND: ContextVar["Rendezvous"] = ContextVar("agent_round")  # the episodes' rendezvous, for `judge`


@dataclass(frozen=True)
class EpisodeLimits:
    """Per episode: model turns, tool calls, tokens in the conversation (None: only each turn's max_tokens),
    wall-clock seconds."""

    max_turns: int = 8
    max_tool_calls: int = 8
    max_total_tokens: int | None = None
    max_wall_s: float = 600.0


class EpisodeLimit(Exception):
    """An episode asked for more than its limits allow; `reason` is "turns", "tool_calls", "tokens" or "wall_time"."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"episode limit reached: {reason}")
        self.reason = reason


@dataclass
class Episode:
    """What one episode left: its conversation, its reward (NaN: unscored), why it ended ("done" or a limit, or
    the workflow's error), the last model turn's finish reason, and its tool counts."""

    conversation: Conversation
    reward: float = math.nan
    end_reason: str = "done"
    finish_reason: str = "length"
    counts: Counter = field(default_factory=Counter)


class Rendezvous:
    """Requests of the live episodes by kind, served in batches (module docstring). `handlers[kind](items)`
    returns one result per item, in order; it runs in the loop's thread (tools in their own threads go on
    meanwhile)."""

    def __init__(self, handlers: dict[str, Callable[[list], list]], live: int, idle_s: float = 0.005) -> None:
        self.handlers, self.live, self.idle_s = handlers, live, idle_s
        self.pending: dict[str, list[tuple[object, asyncio.Future]]] = {kind: [] for kind in handlers}
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> int:
        return sum(len(items) for items in self.pending.values())

    async def request(self, kind: str, item):
        future = asyncio.get_running_loop().create_future()
        self.pending[kind].append((item, future))
        self._changed.set()
        return await future

    def finished(self) -> None:
        self.live -= 1
        self._changed.set()

    async def serve(self) -> None:
        while self.live:
            if self.waiting and self.waiting >= self.live:
                self._serve_all()
                continue
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.idle_s if self.waiting else None)
            except asyncio.TimeoutError:  # some wait while others work in threads: do not keep them waiting
                self._serve_all()

    def _serve_all(self) -> None:
        for kind, handler in self.handlers.items():
            batch, self.pending[kind] = self.pending[kind], []
            if not batch:
                continue
            try:  # in this thread: torch in a second thread would start a second pool of intra-op threads
                results = handler([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - the episodes that asked see the failure
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


class EngineRequests:
    """The "generate" handler: a batch of (prompt tokens, SamplingParams, token limit) as few engine calls as
    their sampling settings allow, in request order. Round r of a rollout seeded `seed` draws with seed
    seed + r x stride (round 0: the rollout's own seed, as a plain rollout draws)."""

    def __init__(self, engine, weight_update=None, seed: int | None = None) -> None:
        self.engine, self.weight_update, self.seed = engine, weight_update, seed
        self.rounds = 0
        self.seconds = 0.0

    def __call__(self, requests: list[tuple[list[int], SamplingParams, int]]) -> list[Generation]:
        started = time.perf_counter()
        by_settings: dict[SamplingParams, list[int]] = {}
        for index, (_, params, _) in enumerate(requests):
            by_settings.setdefault(replace(params, max_new_tokens=1), []).append(index)
        results: list[Generation | None] = [None] * len(requests)
        for offset, (settings, indices) in enumerate(by_settings.items()):
            seed = None if self.seed is None else self.seed + (self.rounds + offset) * _SEED_STRIDE
            limits = [requests[i][2] for i in indices]
            params = replace(settings, max_new_tokens=max(limits), seed=seed)
            generations = self.engine.generate([requests[i][0] for i in indices], params, self.weight_update,
                                               max_new_tokens=limits)
            for i, generation in zip(indices, generations, strict=True):
                results[i] = generation
        self.rounds += len(by_settings)
        self.seconds += time.perf_counter() - started
        return results


class AgentClient:
    """The OpenAI-shaped client of one episode (module docstring). `defaults` are the run's sampling settings;
    a call's temperature, top_p and max_tokens override them."""

    def __init__(self, rendezvous: Rendezvous, conversation: Conversation, episode: Episode, defaults: SamplingParams,
                 limits: EpisodeLimits, decode: Callable[[list[int]], str], name: str = "episode") -> None:
        self._rendezvous, self._conversation, self._episode = rendezvous, conversation, episode
        self._defaults, self._limits, self._decode = defaults, limits, decode
        self._name = name
        self.base_url: str | None = None  # this episode's OpenAI-compatible endpoint, when the run serves one
        self.limit_reason: str | None = None  # the episode limit a request ran into
        self._started = time.monotonic()
        self._turns = 0
        self.completion_ids: list[str] = []  # in the order the completions were made
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._chat))
        self.completions = SimpleNamespace(create=self._complete)

    async def _chat(self, messages: list[dict], tools: list[dict] | None = None, temperature: float | None = None,
                    max_tokens: int | None = None, top_p: float | None = None, **_) -> SimpleNamespace:
        prompt = self._conversation.prompt_for(list(messages), tools)
        generation = await self._generate(prompt, temperature, max_tokens, top_p)
        known = {tool["function"]["name"] for tool in tools or []}
        reply = parse_tool_calls(self._text(generation), known, id_prefix=f"{self.completion_ids[-1]}-call")
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in reply.calls]
        message = {"role": "assistant", "content": reply.content, "tool_calls": calls or None}
        self._conversation.add_reply(message, generation.tokens, generation.logprobs, generation.versions,
                                     generation.finish_reason)
        counts = self._episode.counts
        counts["tool_calls"] += len(calls)
        counts["malformed_tool_calls"] += len(reply.malformed)
        finish = "tool_calls" if calls else generation.finish_reason
        return SimpleNamespace(id=self.completion_ids[-1], choices=[SimpleNamespace(index=0, finish_reason=finish, message=SimpleNamespace(
            role="assistant", content=reply.content, malformed_tool_calls=reply.malformed, tool_calls=[
                SimpleNamespace(id=c["id"], type="function", function=SimpleNamespace(**c["function"]))
                for c in calls] or None))])

    async def _complete(self, prompt: str | list[int], temperature: float | None = None,
                        max_tokens: int | None = None, top_p: float | None = None, **_) -> SimpleNamespace:
        if self._turns:
            raise ValueError("completions.create is one prompt and one answer: use chat.completions for more turns")
        tokens = self._conversation.prompt_for_text(prompt) if isinstance(prompt, str) else \
            self._conversation.prompt_for_tokens(list(prompt))
        generation = await self._generate(tokens, temperature, max_tokens, top_p)
        self._conversation.add_reply({"role": "assistant", "content": None}, generation.tokens, generation.logprobs,
                                     generation.versions, generation.finish_reason)
        return SimpleNamespace(id=self.completion_ids[-1], choices=[SimpleNamespace(index=0, text=self._text(generation),
                                                        finish_reason=generation.finish_reason)])

    def _check_limits(self, prompt: list[int]) -> float:
        """Raises EpisodeLimit for the first limit this request would pass; returns the tokens left for it."""
        limits = self._limits
        room = math.inf if limits.max_total_tokens is None else limits.max_total_tokens - len(prompt)
        for reason, reached in (("turns", self._turns >= limits.max_turns),
                                ("tool_calls", self._episode.counts["tool_calls"] > limits.max_tool_calls),
                                ("wall_time", time.monotonic() - self._started > limits.max_wall_s),
                                ("tokens", room < 1)):
            if reached:
                self.limit_reason = reason
                raise EpisodeLimit(reason)
        return room

    async def _generate(self, prompt: list[int], temperature, max_tokens, top_p) -> Generation:
        room = self._check_limits(prompt)
        defaults = self._defaults
        params = replace(defaults, temperature=defaults.temperature if temperature is None else temperature,
                         top_p=defaults.top_p if top_p is None else top_p)
        limit = min(room, defaults.max_new_tokens if max_tokens is None else max_tokens)
        self._turns += 1
        self.completion_ids.append(f"{self._name}-{self._turns - 1}")
        generation = await self._rendezvous.request("generate", (prompt, params, limit))
        self._episode.finish_reason = generation.finish_reason
        return generation

    def _text(self, generation: Generation) -> str:
        return self._decode(generation.tokens)  # the run's decode leaves out special tokens (the stop token)


class JudgeRequests:
    """The "judge" handler: a batch of (response, solutions) as one `verify_batch` call; adds up the verdicts'
    failures (by reason) and the seconds spent."""

    def __init__(self, verifier) -> None:
        self.verifier = verifier
        self.failures: Counter = Counter()
        self.seconds = 0.0

    def __call__(self, requests: list[tuple[str, Sequence[str]]]) -> list:
        started = time.perf_counter()
        verdicts = self.verifier.verify_batch([text for text, _ in requests], [list(s) for _, s in requests])
        self.failures.update(v.failure for v in verdicts if v.failure)
        self.seconds += time.perf_counter() - started
        return verdicts


async def judge(response: str, solutions: Sequence[str]):
    """The verifier's Verdict on `response`, served in a batch with the other episodes' (WorkflowContext.judge)."""
    return await _ROUND.get().request("judge", (response, list(solutions)))


async def run_episodes(workflow, items: Sequence[dict], make_conversation: Callable[[], Conversation],
                       engine_requests: EngineRequests, judge: Callable[[list], list] | None,
                       defaults: SamplingParams, limits: EpisodeLimits, decode: Callable[[list[int]], str],
                       limit_reward: float = math.nan, discount: float = 1.0, server=None) -> list[Episode]:
    """Runs `workflow.run(item, client)` for every item concurrently; returns their episodes in item order. A
    workflow's "judge" requests (its context's `judge`) are served in batches like completions. An episode ended
    by a limit gets `limit_reward`; a workflow's rewards per completion count discount^k for the k-th completion
    (the episode's return from its start). With `server` (an AgentServer), each episode's client is also served
    over HTTP at `client.base_url` for the round."""
    handlers = {"generate": engine_requests}
    if judge is not None:
        handlers["judge"] = judge
    rendezvous = Rendezvous(handlers, live=len(items))
    _ROUND.set(rendezvous)
    episodes = [Episode(make_conversation()) for _ in items]

    async def one(index: int, item: dict) -> None:
        episode = episodes[index]
        client = AgentClient(rendezvous, episode.conversation, episode, defaults, limits, decode, name=f"e{index}")
        if server is not None:
            server.clients[f"e{index}"], client.base_url = client, server.base_url(f"e{index}")
        try:
            try:
                value = await workflow.run(item, client)
            except Exception:  # noqa: BLE001 - a limit reached over HTTP comes back as the agent's own error
                if client.limit_reason is None:
                    raise
            if client.limit_reason is not None:
                episode.end_reason, episode.reward = client.limit_reason, limit_reward
            else:
                episode.reward = _episode_reward(value, client.completion_ids, discount)
            conversation, counts = episode.conversation, episode.counts
            model_tokens = sum(conversation.mask)
            counts.update(episodes=1, turns=len(client.completion_ids), model_tokens=model_tokens,
                          environment_tokens=len(conversation.mask) - model_tokens,
                          episodes_with_tool_calls=int(counts["tool_calls"] > 0))
            counts[f"ended_{episode.end_reason}"] += 1
        finally:
            rendezvous.finished()
            if server is not None:
                server.clients.pop(f"e{index}", None)

    if server is not None:
        await server.start()
    try:
        await asyncio.gather(rendezvous.serve(), *(one(i, item) for i, item in enumerate(items)))
    finally:
        if server is not None:
            await server.stop()
    return episodes


def _episode_reward(value, completion_ids: list[str], discount: float) -> float:
    """A workflow's return value as the episode's reward: a number, or {completion id: reward} summed with
    discount^k for the k-th completion of the episode."""
    if not isinstance(value, dict):
        return float(value)
    unknown = set(value) - set(completion_ids)
    if unknown:
        raise ValueError(f"rewards for completions this episode did not make: {sorted(unknown)[:3]}")
    return float(sum(value[key] * discount**k for k, key in enumerate(completion_ids) if key in value))
