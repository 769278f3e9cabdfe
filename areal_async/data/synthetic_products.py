"""A task where a tool is the only way to be right: the product of a 3-digit and a 4-digit number.

The prompt is the product as text (`123*4567`), the user's message of a chat whose model may call `calculator`
(areal_async/agents/tools.py). A tiny model cannot multiply such numbers, but it can learn to send the product to
the calculator and copy the result into `\\boxed{}`. The warm start (`areal-async sft --config sft_agent_cpu`) is
trained on conversations rendered by the run's own chat template and tool-call format
(`tool_demonstration`): some call the calculator and copy its answer, the others answer directly with a guess
that is usually wrong, so RL has both behaviours to choose from.
"""

from __future__ import annotations

import hashlib
import json
import random

from areal_async.agents.chat import Conversation
from areal_async.agents.tool_calls import render_tool_call
from areal_async.agents.tools import Calculator
from areal_async.data.records import PromptRecord

HELD_OUT_BUCKETS = 10  # one problem in ten (by hash) is reserved for the held-out set
FIRST, SECOND = range(100, 1000), range(1000, 10000)


def _is_held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] % HELD_OUT_BUCKETS == 0


def product_problems(count: int, seed: int, held_out: bool) -> list[PromptRecord]:
    """`count` distinct problems of the training split (held_out=False) or the held-out one (disjoint by a hash of
    the prompt, so any seeds can be combined); each record's solution is the product."""
    rng = random.Random(seed)
    records: list[PromptRecord] = []
    seen: set[str] = set()
    while len(records) < count:
        a, b = rng.choice(FIRST), rng.choice(SECOND)
        prompt = f"{a}*{b}"
        if prompt in seen or _is_held_out(prompt) != held_out:
            continue
        seen.add(prompt)
        records.append(PromptRecord(f"product-{a}x{b}", prompt, (str(a * b),)))
    return records


def guessed_product(a: int, b: int, rng: random.Random) -> int:
    """What a model that does not multiply writes: the right leading digits, the rest at random."""
    exact = str(a * b)
    keep = rng.randint(1, 3)
    return int(exact[:keep] + "".join(str(rng.randint(0, 9)) for _ in exact[keep:]))


def tool_demonstration(record: PromptRecord, conversation: Conversation, rng: random.Random, tool_rate: float,
                       tools: list[dict]) -> None:
    """Writes one demonstration into an empty `conversation` (the run's chat template and tokenizer): with
    probability `tool_rate` a calculator call on the problem, its result, and the result in \\boxed{}; otherwise a
    direct answer, a guess (`guessed_product`). Model turns get loss mask 1, the rest 0, as in a rollout."""
    tokenizer = conversation.tokenizer
    a, b = (int(part) for part in record.prompt.split("*"))
    messages = [{"role": "user", "content": record.prompt}]

    def reply(text: str, message: dict) -> None:
        tokens = list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]
        conversation.add_reply(message, tokens, [0.0] * len(tokens), [0] * len(tokens), "stop")

    conversation.prompt_for(messages, tools)
    if rng.random() < tool_rate:
        arguments = {"expression": record.prompt}
        call = {"id": "call-0", "type": "function",
                "function": {"name": Calculator.name, "arguments": json.dumps(arguments)}}
        message = {"role": "assistant", "content": "", "tool_calls": [call]}
        reply(render_tool_call(Calculator.name, arguments), message)
        result = Calculator()(arguments)  # what the tool answers in a rollout
        messages += [message, {"role": "tool", "tool_call_id": "call-0", "name": Calculator.name, "content": result}]
        conversation.prompt_for(messages, tools)
        answer = result
    else:
        answer = guessed_product(a, b, rng)
    text = f"\\boxed{{{answer}}}"
    reply(text, {"role": "assistant", "content": text, "tool_calls": None})
