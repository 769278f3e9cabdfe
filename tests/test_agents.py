"""Agent workflows: chat templates and token-in/token-out conversations, the episodes' runtime (batched requests,
limits, rewards), the shipped workflows over a scripted engine, and a workflow named by import path."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from actors.agent_runtime import EpisodeLimits
from actors.rollout import RolloutWorker, build_rollout_worker, load_workflow
from areal_async.agents.chat import (
    Conversation,
    NotAppendOnly,
    RoleTemplate,
    role_template,
    user_content,
)
from areal_async.agents.tools import Calculator
from areal_async.agents.workflows import MultiTurnRetry, SingleTurnMath, ToolIntegratedReasoning
from areal_async.config import GenerationConfig, PromptType, ToolName, TrainConfig
from areal_async.model.tokenizer import build_byte_tokenizer, load_tokenizer
from areal_async.prompts import prompt_format
from areal_async.reward import Verdict
from areal_async.types import Generation, PromptGroup


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_byte_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("prompt_type", [PromptType.boxed, PromptType.r1_distilled, PromptType.orz, PromptType.none])
def test_one_user_message_renders_the_prompt_types_prompt(prompt_type):
    template = role_template(prompt_type, "<|eos|>")
    text = template.render([{"role": "user", "content": user_content(prompt_type, "37+45")}], None, True)
    assert text == prompt_format(prompt_type).render("37+45")


class ScriptedEngine:
    """Answers each prompt by the reply its text asks for: the last "Q:"/"R:" line decides (see `reply_for`).
    Records its calls; versions go up by one per call."""

    def __init__(self, tokenizer, reply_for) -> None:
        self.tokenizer, self.reply_for = tokenizer, reply_for
        self.version = 0
        self.calls: list[int] = []

    def generate(self, prompts, params, weight_update=None, max_new_tokens=None):
        self.calls.append(len(prompts))
        self.version += 1
        out = []
        self.outputs = getattr(self, "outputs", [])  # every generation, in call order
        for prompt, limit in zip(prompts, max_new_tokens or [params.max_new_tokens] * len(prompts)):
            text = self.reply_for(self.tokenizer.decode(prompt))
            tokens = self.tokenizer.encode(text, add_special_tokens=False)[:limit]
            finish = "length" if len(tokens) == limit else "stop"
            tokens += [self.tokenizer.eos_token_id] if finish == "stop" else []
            out.append(Generation(tokens, [-0.25] * len(tokens), [self.version] * len(tokens), finish))
        self.outputs += out
        return out


class ExactVerifier:
    correct_reward, incorrect_reward = 5.0, -5.0

    def __init__(self) -> None:
        self.calls: list[int] = []

    def verify_batch(self, responses, gold_answers):
        self.calls.append(len(responses))
        return [Verdict(f"\\boxed{{{gold[0]}}}" in response) for response, gold in zip(responses, gold_answers)]


def group(problem: str, answer: str, size: int, index: int = 0) -> PromptGroup:
    return PromptGroup(f"g{index}", f"q{index}", problem, np.array([1, 2, 3], dtype=np.int32), (answer,), size, 0)


def worker_for(tokenizer, engine, workflow, tools=(), limits=EpisodeLimits(), max_attempts=3) -> RolloutWorker:
    return RolloutWorker(engine, lambda t: tokenizer.decode(t, skip_special_tokens=True), ExactVerifier(),
                         [tokenizer.eos_token_id], workflow=workflow, tokenizer=tokenizer,
                         chat_template=role_template(PromptType.boxed, tokenizer.eos_token), limits=limits,
                         tools=tools, max_attempts=max_attempts, discount=0.5)


def calculator_agent(prompt: str) -> str:
    """Calls the calculator on the question, then copies the tool's result into \\boxed{}."""
    last = prompt.rstrip().splitlines()[-2]  # the line before "A: "
    if last.startswith("R: "):
        return f"\\boxed{{{last[3:]}}}"
    question = last[3:]
    return f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{question}"}}}}\n</tool_call>'


def test_a_tool_episode_is_one_token_sequence_with_the_models_tokens_masked_in(tokenizer):
    engine = ScriptedEngine(tokenizer, calculator_agent)
    worker = worker_for(tokenizer, engine, ToolIntegratedReasoning, tools=[Calculator()])
    [trajectory] = worker.rollout([group("123*45", "5535", 1)], GenerationConfig(max_new_tokens=200), seed=0)
    assert trajectory.reward == 5.0 and trajectory.finish_reason == "stop"
    text = tokenizer.decode(np.concatenate([trajectory.prompt_tokens, trajectory.output_tokens]))
    assert text.startswith("Tools: calculator\nQ: 123*45\nA: <tool_call>")
    assert text.endswith("</tool_call><|eos|>\nR: 5535\nA: \\boxed{5535}<|eos|>")
    # the mask is 1 on exactly the engine's tokens of both turns, and 0 on the template's "\nR: 5535\nA: "
    mask = trajectory.loss_mask
    model = [tokenizer.decode(trajectory.output_tokens[start:end])
             for start, end in runs(mask, 1)]
    assert [part.endswith("<|eos|>") for part in model] == [True, True]
    assert [tokenizer.decode(trajectory.output_tokens[s:e]) for s, e in runs(mask, 0)] == ["\nR: 5535\nA: "]
    assert np.all(trajectory.behaviour_logprobs[mask == 0] == 0.0)
    # versions: each model turn its own; the appended tokens carry the version of the model token before them
    assert sorted(set(trajectory.versions.tolist())) == [1, 2] and trajectory.oldest_version == 1
    assert worker.last_round["episodes"] == Counter(
        episodes=1, ended_done=1, tool_calls=1, tool_calculator_ok=1, episodes_with_tool_calls=1, turns=2,
        model_tokens=int(mask.sum()), environment_tokens=int((mask == 0).sum()))


def runs(mask: np.ndarray, value: int) -> list[tuple[int, int]]:
    """(start, end) of each run of `value` in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (mask == value).astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_every_episode_waits_for_the_others_so_a_round_is_one_batch(tokenizer):
    engine = ScriptedEngine(tokenizer, calculator_agent)
    worker = worker_for(tokenizer, engine, ToolIntegratedReasoning, tools=[Calculator()])
    groups = [group(f"{11 * (i + 1)}*7", str(77 * (i + 1)), 4, i) for i in range(3)]
    trajectories = worker.rollout(groups, GenerationConfig(max_new_tokens=200), seed=0)
    assert engine.calls == [12, 12] and worker.verifier.calls == [12]  # two turns, one judgement, all batched
    assert [t.reward for t in trajectories] == [5.0] * 12


def test_a_malformed_call_gets_a_tool_message_saying_what_was_wrong(tokenizer):
    def agent(prompt: str) -> str:
        return "\\boxed{1}" if "R: error:" in prompt else '<tool_call>{"name": "calculator", "arguments": {]</tool_call>'

    worker = worker_for(tokenizer, ScriptedEngine(tokenizer, agent), ToolIntegratedReasoning, tools=[Calculator()])
    [trajectory] = worker.rollout([group("1", "1", 1)], GenerationConfig(max_new_tokens=200), seed=0)
    assert "R: error: the tool call is not valid JSON" in tokenizer.decode(trajectory.output_tokens)
    counts = worker.last_round["episodes"]
    assert counts["malformed_tool_calls"] == counts["malformed_answered"] == 1 and trajectory.reward == 5.0


def test_a_limit_ends_the_episode_with_its_reason_and_the_incorrect_reward(tokenizer):
    engine = ScriptedEngine(tokenizer, lambda prompt: '<tool_call>{"name": "calculator", "arguments": '
                                                      '{"expression": "1+1"}}</tool_call>')
    worker = worker_for(tokenizer, engine, ToolIntegratedReasoning, tools=[Calculator()],
                        limits=EpisodeLimits(max_turns=3))
    [trajectory] = worker.rollout([group("1+1", "2", 1)], GenerationConfig(max_new_tokens=200), seed=0)
    assert trajectory.reward == -5.0 and worker.last_round["episodes"]["ended_turns"] == 1
    assert engine.calls == [1, 1, 1]


def test_retry_discounts_a_later_right_answer(tokenizer):
    engine = ScriptedEngine(tokenizer, lambda prompt: "\\boxed{4}" if "try again" in prompt else "\\boxed{5}")
    worker = worker_for(tokenizer, engine, MultiTurnRetry, max_attempts=3)
    [trajectory] = worker.rollout([group("2+2", "4", 1)], GenerationConfig(max_new_tokens=50), seed=0)
    assert trajectory.reward == 5.0 * 0.5
    assert "Q: That answer is not correct. Check your work and try again.\nA: " in tokenizer.decode(
        trajectory.output_tokens)


def test_conversation_refuses_a_changed_history_and_a_template_that_rewrites(tokenizer):
    conversation = Conversation(role_template(PromptType.boxed, "<|eos|>"), tokenizer)
    first = [{"role": "user", "content": "hi"}]
    conversation.prompt_for(first, None)
    reply = tokenizer.encode("yo", add_special_tokens=False) + [tokenizer.eos_token_id]
    conversation.add_reply({"role": "assistant", "content": "yo", "tool_calls": None}, reply, [0.0] * 3, [0] * 3,
                           "stop")
    with pytest.raises(ValueError, match="earlier messages changed"):
        conversation.prompt_for([{"role": "user", "content": "hello"}, conversation.messages[1],
                                 {"role": "user", "content": "more"}], None)

    class Forgetful(RoleTemplate):
        """Drops earlier assistant turns once a later user turn exists (as templates that hide reasoning do)."""

        def render(self, messages, tools, add_generation_prompt):
            kept = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == len(messages) - 1]
            return super().render(kept, tools, add_generation_prompt)

    forgetful = Conversation(Forgetful(), tokenizer)
    forgetful.prompt_for(first, None)
    forgetful.add_reply({"role": "assistant", "content": "yo", "tool_calls": None}, reply, [0.0] * 3, [0] * 3, "stop")
    with pytest.raises(NotAppendOnly, match="message 2 \\(user\\)"):
        forgetful.prompt_for([*forgetful.messages, {"role": "user", "content": "more"}], None)


class RewardsPerCompletion:
    """Two completions; the second one alone is rewarded."""

    def __init__(self, context) -> None:
        self.context = context

    async def run(self, data, client):
        messages = [{"role": "user", "content": data["prompt"]}]
        first = await client.chat.completions.create(messages=messages)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "again"}]
        second = await client.chat.completions.create(messages=messages)
        return {first.id: 0.0, second.id: 3.0}


def test_rewards_per_completion_are_discounted_to_the_episode_start(tokenizer):
    worker = worker_for(tokenizer, ScriptedEngine(tokenizer, lambda prompt: "ok"), RewardsPerCompletion)
    [trajectory] = worker.rollout([group("x", "y", 1)], GenerationConfig(max_new_tokens=10), seed=0)
    assert trajectory.reward == 3.0 * 0.5


def test_single_turn_math_is_one_completion_of_the_prompt_tokens(tokenizer):
    engine = ScriptedEngine(tokenizer, lambda prompt: "\\boxed{7}")
    worker = worker_for(tokenizer, engine, SingleTurnMath)
    trajectories = worker.rollout([group("ignored", "7", 3)], GenerationConfig(max_new_tokens=20), seed=0)
    assert [t.prompt_tokens.tolist() for t in trajectories] == [[1, 2, 3]] * 3
    assert all(t.loss_mask.all() and t.reward == 5.0 for t in trajectories) and engine.calls == [3]


def test_a_workflow_is_named_by_import_path(tmp_path, monkeypatch):
    assert load_workflow("areal_async.agents.workflows:ToolIntegratedReasoning") is ToolIntegratedReasoning
    package = tmp_path / "my_agents.py"
    package.write_text("class Solver:\n    def __init__(self, context):\n        self.context = context\n\n"
                       "    async def run(self, data, client):\n        return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_workflow("my_agents:Solver").__name__ == "Solver"
    for path, words in (("my_agents:Nope", "AttributeError"), ("no_such_module:Solver", "ModuleNotFoundError"),
                        ("areal_async.agents.workflows:WorkflowContext", "has no run\\(data, client\\)")):
        with pytest.raises(ValueError, match=f"rollout.workflow: .*{words}"):
            load_workflow(path)


def test_the_run_builds_its_worker_from_config(tokenizer):
    config = TrainConfig()
    config.rollout.workflow = "areal_async.agents.workflows:ToolIntegratedReasoning"
    config.rollout.agent.tools = [ToolName.calculator]
    config.rollout.agent.max_turns = 2
    worker = build_rollout_worker(config, ScriptedEngine(tokenizer, calculator_agent), tokenizer, ExactVerifier())
    assert isinstance(worker.workflow, ToolIntegratedReasoning) and worker.limits.max_turns == 2
    [trajectory] = worker.rollout([group("6*7", "42", 1)], GenerationConfig(max_new_tokens=200), seed=0)
    assert trajectory.reward == 5.0 and not math.isnan(trajectory.reward)
    worker.close()


class OpenAIPackageAgent:
    """An agent written against the official openai package, talking to its episode's endpoint over HTTP."""

    def __init__(self, context) -> None:
        self.context = context

    async def run(self, data, client):
        import openai

        remote = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": data["prompt"]}]
        tools = [Calculator.schema]
        while True:
            completion = await remote.chat.completions.create(model="policy", messages=messages, tools=tools)
            message = completion.choices[0].message
            messages.append(message.model_dump(include={"role", "content", "tool_calls"}))
            if not message.tool_calls:
                await remote.close()
                return await self.context.reward(message.content, data["solutions"])
            for call in message.tool_calls:
                result = Calculator()(json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


def test_an_agent_on_the_openai_package_is_recorded_as_one_in_process(tokenizer):
    pytest.importorskip("openai")
    problems = [group("123*45", "5535", 2, 0), group("6*7", "42", 1, 1)]
    over_http = worker_for(tokenizer, ScriptedEngine(tokenizer, calculator_agent), OpenAIPackageAgent)
    over_http.http_address = ("127.0.0.1", 0)
    in_process = worker_for(tokenizer, ScriptedEngine(tokenizer, calculator_agent), ToolIntegratedReasoning,
                            tools=[Calculator()])
    remote = over_http.rollout(problems, GenerationConfig(max_new_tokens=200), seed=0)
    local = in_process.rollout(problems, GenerationConfig(max_new_tokens=200), seed=0)
    # no re-tokenisation: the masked-in tokens are exactly the engine's, turn after turn
    engine_tokens = sorted(tuple(g.tokens) for g in over_http.engine.outputs)
    recorded = sorted(tuple(int(t) for t in trajectory.output_tokens[start:end]) for trajectory in remote
                      for start, end in runs(trajectory.loss_mask, 1))
    assert recorded == engine_tokens and len(recorded) == 2 * len(remote)
    for theirs, ours in zip(remote, local):
        assert theirs.reward == ours.reward == 5.0
        for name in ("prompt_tokens", "output_tokens", "behaviour_logprobs", "versions", "loss_mask"):
            assert np.array_equal(getattr(theirs, name), getattr(ours, name)), name


def test_the_endpoint_answers_bad_requests_in_the_apis_shape(tokenizer):
    import asyncio
    import urllib.error
    import urllib.request

    class Probe:
        def __init__(self, context) -> None:
            self.context = context

        async def run(self, data, client):
            def post(path: str, body: bytes) -> tuple[int, dict]:
                request = urllib.request.Request(client.base_url + path, data=body, method="POST")
                try:
                    with urllib.request.urlopen(request) as response:
                        return response.status, json.loads(response.read())
                except urllib.error.HTTPError as error:
                    return error.code, json.loads(error.read())

            answers = []
            for path, body in (("/chat/completions", b"not json"), ("/chat/completions", b'{"messages": 3}'),
                               ("/chat/completions", b'{"messages": [], "stream": true}'), ("/embeddings", b"{}"),
                               ("/chat/completions", b'{"messages": [], "tool_choice": "required"}')):
                answers.append(await asyncio.to_thread(post, path, body))
            return answers

    worker = worker_for(tokenizer, ScriptedEngine(tokenizer, calculator_agent), Probe)
    worker.http_address = ("127.0.0.1", 0)
    captured = {}

    async def keep(data, client, run=worker.workflow.run):
        captured["answers"] = await run(data, client)
        return 0.0

    worker.workflow.run = keep
    worker.rollout([group("1", "1", 1)], GenerationConfig(max_new_tokens=10), seed=0)
    assert [(status, body["error"]["type"]) for status, body in captured["answers"]] == [
        (400, "invalid_request_error"), (400, "invalid_request_error"), (400, "invalid_request_error"),
        (404, "not_found"), (400, "invalid_request_error")]
    assert "streaming is not supported" in captured["answers"][2][1]["error"]["message"]
    assert 'tool_choice must be "auto"' in captured["answers"][4][1]["error"]["message"]
