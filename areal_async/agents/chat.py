"""Chat templates and token-in/token-out conversations.

A `Conversation` is one token sequence. Its model turns are the engine's own tokens, never decoded and encoded
again; between them it appends only the template's text for the new messages (and the rest of the template's
end of an assistant turn after the model's stop token), encoded once. Its loss mask is 1 on the model's tokens
and 0 on everything it appended.

The new messages' text is the difference between two renderings: the history with the new messages (and the
generation prompt) less the history alone. That needs a template that only appends: rendering more messages
must not change the text of earlier ones. A template that does (one that drops earlier reasoning, say) raises
`NotAppendOnly` the first time it happens, naming the message.

Two kinds of template:
- `RoleTemplate`: text around each role's content (the project's own tiny models, and one per prompt type, so a
  single-turn chat renders exactly the prompt of `areal_async.prompts`);
- `TokenizerTemplate`: a tokenizer's own Jinja chat template (transformers' `apply_chat_template`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from areal_async.agents.tool_calls import render_reply, render_tools
from areal_async.config import PromptType
from areal_async.prompts import encode_prompt

ROLES = ("system", "user", "assistant", "tool")
_PROBE = "\x00probe\x00"  # stands in for an assistant reply, to find the template's text around one


class NotAppendOnly(ValueError):
    """The chat template rewrote earlier messages when more were added: token-in/token-out cannot use it."""


class ChatTemplate(Protocol):
    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        """The text of `messages` (OpenAI-style dicts), with the tools block and, if asked, the generation
        prompt (the start of an assistant turn)."""


@dataclass(frozen=True)
class RoleTemplate:
    """Text around each message: `begin` once, then each role's `{content}` pattern; an assistant turn is
    `assistant` + its reply (content, then its tool calls) + `end_of_turn` (the stop token's text first, where
    the model ends its turn with one). Tools go into a system message (added first when there is none) as
    `tools`, where {block} is the tools block of tool_calls.render_tools and {names} their names."""

    begin: str = ""
    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    tool: str = "Tool: {content}\n"
    assistant: str = "Assistant: "
    end_of_turn: str = "\n"
    tools: str = "{block}"

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        messages = with_tools_in_system(messages, tools, self.tools)
        parts = [self.begin]
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
            if role == "assistant":
                reply = render_reply(message.get("content") or "", message.get("tool_calls"))
                parts.append(self.assistant + reply + self.end_of_turn)
            else:
                parts.append(getattr(self, role).replace("{content}", str(message.get("content") or "")))
        if add_generation_prompt:
            parts.append(self.assistant)
        return "".join(parts)


def with_tools_in_system(messages: list[dict], tools: list[dict] | None, pattern: str = "{block}") -> list[dict]:
    """`messages` with the tools (`pattern`: {block}, the tools block; {names}, their names) at the end of the
    system message (a system message first if none)."""
    if not tools:
        return list(messages)
    names = ", ".join(tool["function"]["name"] for tool in tools)
    block = pattern.replace("{names}", names).replace("{block}", render_tools(tools) if "{block}" in pattern else "")
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{block}".lstrip()}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


class TokenizerTemplate:
    """A tokenizer's Jinja chat template (`tokenizer.chat_template`), rendered by transformers."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template: use a RoleTemplate")
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def role_template(prompt_type: PromptType | str, eos_text: str) -> RoleTemplate:
    """The chat template of a prompt type: one user message renders exactly the prompt type's prompt (with the
    instructions of `areal_async.prompts` in the user's content, see `user_content`); the model ends a turn with
    `eos_text`, and tool results and further user turns follow in the prompt type's own style."""
    prompt_type = PromptType(prompt_type)
    if prompt_type is PromptType.r1_distilled:
        return RoleTemplate(begin="<｜begin▁of▁sentence｜>", system="{content}", user="<｜User｜>{content}",
                            tool="<｜User｜>Tool result: {content}", assistant="<｜Assistant｜><think>\n",
                            end_of_turn=eos_text)
    if prompt_type is PromptType.orz:
        return RoleTemplate(begin=ORZ_PREAMBLE, system="{content}\n", user="User: {content}\n",
                            tool="Tool: {content}\n", assistant="Assistant: <think>", end_of_turn=eos_text + "\n")
    if prompt_type is PromptType.boxed:
        return RoleTemplate(system="{content}\n", user="Q: {content}\n", tool="R: {content}\n", assistant="A: ",
                            end_of_turn=eos_text + "\n", tools="Tools: {names}")  # short: tiny models
    return RoleTemplate(system="{content}\n", user="{content}", tool="{content}\n", assistant="",
                        end_of_turn=eos_text)


ORZ_PREAMBLE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. ")

R1_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def user_content(prompt_type: PromptType | str, problem: str) -> str:
    """A problem as the user's message under a prompt type (the instructions its prompt carries after it)."""
    return problem + R1_INSTRUCTION if PromptType(prompt_type) is PromptType.r1_distilled else problem


@dataclass
class Conversation:
    """One episode's token sequence (see the module docstring). `tokens[:prompt_length]` is its first prompt;
    `mask`, `logprobs` and `versions` cover the tokens after it (the trajectory's output): 1 / behaviour logprob /
    the producing version on the model's tokens, 0 / 0.0 / the version of the model token before on the ones
    appended between turns."""

    template: ChatTemplate
    tokenizer: object
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    prompt_length: int = 0
    _last_turn: tuple[list[int], str] = ([], "")  # the last model turn's tokens and finish reason

    def prompt_for(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """Appends the template's text for the messages after those already in the conversation (and the
        generation prompt); returns the whole token sequence, the next model turn's prompt."""
        known = len(self.messages)
        if [_comparable(m) for m in messages[:known]] != [_comparable(m) for m in self.messages]:
            raise ValueError("the conversation's earlier messages changed: pass back the history as the client "
                             "returned it (token-in/token-out keeps the model's own tokens for every turn)")
        if known and (tools or None) != self.tools:
            raise ValueError("the tools changed within a conversation")
        if known and len(messages) == known:
            raise ValueError("no new message since the last reply")
        self.tools = tools or None
        after = self.template.render(messages, self.tools, add_generation_prompt=True)
        if not known:
            self.tokens = encode_prompt(self.tokenizer, after)
            self.prompt_length = len(self.tokens)
        else:
            before = self.template.render(self.messages, self.tools, add_generation_prompt=False)
            if not after.startswith(before):
                raise NotAppendOnly(f"the chat template rewrote earlier text when message {known} "
                                    f"({messages[known].get('role')}) was added")
            self._append(self._end_of_turn_rest() + after[len(before):])
        self.messages = list(messages)
        return list(self.tokens)

    def prompt_for_tokens(self, tokens: list[int]) -> list[int]:
        """A one-shot prompt given as token ids (a completion, not a chat): the conversation's first prompt."""
        if self.tokens:
            raise ValueError("a completion prompt starts a conversation; this one has begun")
        self.tokens, self.prompt_length = list(tokens), len(tokens)
        return list(tokens)

    def prompt_for_text(self, text: str) -> list[int]:
        return self.prompt_for_tokens(encode_prompt(self.tokenizer, text))

    def add_reply(self, message: dict, tokens: list[int], logprobs: list[float], versions: list[int],
                  finish_reason: str) -> None:
        """Records a model turn: its tokens as the engine produced them, and the message the client returned."""
        self.tokens += tokens
        self.mask += [1] * len(tokens)
        self.logprobs += list(logprobs)
        self.versions += list(versions)
        self.messages.append(message)
        self._last_turn = (list(tokens), finish_reason)

    def _end_of_turn_rest(self) -> str:
        """The template's text after the last assistant reply, less the stop token the model ended it with."""
        probe = self.template.render(self.messages[:-1] + [{"role": "assistant", "content": _PROBE}], self.tools,
                                     add_generation_prompt=False)
        suffix = probe[probe.index(_PROBE) + len(_PROBE):]
        tokens, finish_reason = self._last_turn
        if finish_reason == "stop":
            stop = self.tokenizer.decode(tokens[-1:]) if tokens else ""
            if stop and suffix.startswith(stop):
                return suffix[len(stop):]
        return suffix

    def _append(self, text: str) -> None:
        if not text:
            return
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        version = self.versions[-1] if self.versions else 0
        self.tokens += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [version] * len(ids)


def _comparable(message: dict) -> tuple:
    """What identifies a message in a history, whatever client wrote it (key order, None or "" content)."""
    calls = tuple((call.get("id"), call["function"]["name"], _canonical_json(call["function"]["arguments"]))
                  for call in message.get("tool_calls") or [])
    return message.get("role"), message.get("content") or "", calls, message.get("tool_call_id") or ""


def _canonical_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except (TypeError, json.JSONDecodeError):
        return str(text)
