"""Prompt templates (one `PromptFormat` per `config.PromptType`), for evaluation (`eval.prompt_type`,
`areal-async eval --prompt-type`) and for training prompts (`data.prompt_type`), and the part of a response that
is judged.

``{problem}`` in a template is replaced by the problem text (plain substitution: other braces, such as the
``\\boxed{}`` in the instructions, stay as they are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from areal_async.config import PromptType

PLACEHOLDER = "{problem}"


@dataclass(frozen=True)
class PromptFormat:
    """A prompt template.

    Attributes:
        template: Text with one ``{problem}``.
        answer_tag: The response's answer is in ``<answer>...</answer>`` (Open-Reasoner-Zero); see
            :func:`judged_text`.
    """

    template: str
    answer_tag: bool = False

    def render(self, problem: str) -> str:
        return self.template.replace(PLACEHOLDER, problem)


PROMPT_FORMATS: dict[PromptType, PromptFormat] = {
    # DeepSeek-R1-Distill chat format (BOS written out: `encode_prompt` adds no second one)
    PromptType.r1_distilled: PromptFormat(
        "<｜begin▁of▁sentence｜><｜User｜>{problem}\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<｜Assistant｜><think>\n",
    ),
    # Open-Reasoner-Zero style: reasoning in <think></think>, answer in <answer></answer>
    PromptType.orz: PromptFormat(
        "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
        "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
        "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: {problem}\nAssistant: <think>",
        answer_tag=True,
    ),
    # The synthetic task's training format (areal_async.data.synthetic.prompt_text): "Q: 37+45\nA: "
    PromptType.boxed: PromptFormat("Q: {problem}\nA: "),
    # The problem text as it is
    PromptType.none: PromptFormat("{problem}"),
}

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's token ids, by one rule for training, held-out and benchmark prompts: the tokenizer's special
    tokens (its BOS, where it adds one) are added unless the text already begins with the BOS token's text (a
    chat-templated prompt), so no prompt starts with two BOS tokens."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))))


def wrap(template: str, text: str) -> str:
    """`text` put in place of ``{problem}`` in `template`, unless `text` already has the template's words before and
    after it (a prompt file that was templated when it was written is not templated twice)."""
    head, _, tail = template.partition(PLACEHOLDER)
    if len(text) >= len(head) + len(tail) and text.startswith(head) and text.endswith(tail):
        return text
    return template.replace(PLACEHOLDER, text)


PROMPT_TYPE_NAMES = tuple(prompt_type.value for prompt_type in PromptType)


def prompt_format(prompt_type: PromptType | str) -> PromptFormat:
    """The format of a prompt type, given as the enum or by its name."""
    try:
        return PROMPT_FORMATS[PromptType(prompt_type)]
    except ValueError:
        raise ValueError(f"unknown prompt type {prompt_type!r}: choose one of {list(PROMPT_TYPE_NAMES)}") from None


def judged_text(response: str, prompt_format: PromptFormat) -> str:
    """The text handed to the verifier's answer extraction for `response`.

    For most prompt types this is the response itself (the verifier takes the last ``\\boxed{}``, and so on).
    For ``answer_tag`` types the content of the last closed ``<answer>...</answer>`` is used: as it is when it
    contains a ``\\boxed``, else wrapped as ``\\boxed{content}`` so the verifier's boxed extraction takes the
    whole content (``<answer>\\frac{1}{2}</answer>`` -> ``\\frac{1}{2}``, not the last number). A response
    without a closed answer tag is judged whole.
    """
    if not prompt_format.answer_tag:
        return response
    matches = _ANSWER_TAG.findall(response)
    if not matches:
        return response
    content = matches[-1].strip()
    if "\\boxed" in content or "\\fbox" in content:
        return content
    return f"\\boxed{{{content}}}"
