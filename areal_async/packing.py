"""Turning variable-length sequences into padded tensors and micro-batches under a token budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PaddedBatch:
    """Right-padded prompt+output sequences.

    input_ids, valid: [B, T]; output_mask: [B, T-1], True where the next token (t+1) is an output token,
    i.e. where a next-token logprob is trained on; `values[name]`: [B, T-1] per-output-token arrays aligned
    to the same positions (0 elsewhere).
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    output_mask: torch.Tensor
    values: dict[str, torch.Tensor]

    @property
    def num_output_tokens(self) -> int:
        return int(self.output_mask.sum())


def pad_prompt_output_batch(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    pad_token_id: int,
    per_token: dict[str, Sequence[Sequence[float]]] | None = None,
) -> PaddedBatch:
    """prompts[b] + outputs[b] laid out left-aligned; per_token[name][b] has len(outputs[b]) entries."""
    per_token = per_token or {}
    lengths = [len(p) + len(o) for p, o in zip(prompts, outputs, strict=True)]
    batch, longest = len(lengths), max(lengths)
    ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    valid = torch.zeros((batch, longest), dtype=torch.bool)
    output_mask = torch.zeros((batch, longest - 1), dtype=torch.bool)
    values = {name: torch.zeros((batch, longest - 1), dtype=torch.float32) for name in per_token}
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        if len(prompt) == 0:
            raise ValueError(f"sequence {row} has an empty prompt: the first output token would have no context")
        start, end = len(prompt), lengths[row]
        ids[row, :end] = torch.tensor(np.concatenate([np.asarray(prompt), np.asarray(output)]), dtype=torch.long)
        valid[row, :end] = True
        output_mask[row, start - 1 : end - 1] = True
        for name, arrays in per_token.items():
            values[name][row, start - 1 : end - 1] = torch.tensor(np.asarray(arrays[row], dtype=np.float32))
    return PaddedBatch(ids, valid, output_mask, values)


def split_by_token_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Groups sequence indices into micro-batches whose padded size (count x longest) stays within `budget`.

    Longest sequences first, so each micro-batch holds similar lengths; a sequence longer than the budget
    gets a micro-batch of its own. Every index appears exactly once.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
