"""Turning variable-length sequences into padded or packed tensors, token-budget micro-batches, and a
balanced split of sequences over learner ranks."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch


def prompt_output_lengths(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[int]:
    """Tokens of each prompt+output sequence; rejects an empty prompt (its first output token has no context)."""
    lengths = []
    for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        if len(prompt) == 0:
            raise ValueError(f"sequence {index} has an empty prompt: the first output token would have no context")
        lengths.append(len(prompt) + len(output))
    return lengths


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

    def to(self, device: torch.device | str) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.valid.to(device), self.output_mask.to(device),
                           {name: value.to(device) for name, value in self.values.items()})


def pad_prompt_output_batch(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    pad_token_id: int,
    per_token: dict[str, Sequence[Sequence[float]]] | None = None,
) -> PaddedBatch:
    """prompts[b] + outputs[b] laid out left-aligned; per_token[name][b] has len(outputs[b]) entries."""
    per_token = per_token or {}
    lengths = prompt_output_lengths(prompts, outputs)
    batch, longest = len(lengths), max(lengths)
    ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    valid = torch.zeros((batch, longest), dtype=torch.bool)
    output_mask = torch.zeros((batch, longest - 1), dtype=torch.bool)
    values = {name: torch.zeros((batch, longest - 1), dtype=torch.float32) for name in per_token}
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        start, end = len(prompt), lengths[row]
        ids[row, :end] = torch.tensor(np.concatenate([np.asarray(prompt), np.asarray(output)]), dtype=torch.long)
        valid[row, :end] = True
        output_mask[row, start - 1 : end - 1] = True
        for name, arrays in per_token.items():
            values[name][row, start - 1 : end - 1] = torch.tensor(np.asarray(arrays[row], dtype=np.float32))
    return PaddedBatch(ids, valid, output_mask, values)


@dataclass
class PackedBatch:
    """Prompt+output sequences concatenated into one row, without padding (N = total tokens).

    input_ids, positions (restarting at 0 per sequence), document_ids (the sequence's index): [1, N];
    targets: [N], the next token of the same sequence (meaningless at a sequence's last token);
    output_mask: [N] bool, True where the target is an output token the model sampled (its loss mask is 1),
    i.e. where a next-token logprob is trained on; `values[name]`: [N] per-output-token arrays placed where the
    target is an output token (0 elsewhere).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor
    targets: torch.Tensor
    output_mask: torch.Tensor
    values: dict[str, torch.Tensor]
    # The documents' lengths in token order, known on the host (None: read from document_ids when needed).
    # Kept by `to`, so a device copy still lays out its attention without reading document_ids back.
    document_lengths: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_output_tokens(self) -> int:
        return int(self.output_mask.sum())

    def to(self, device: str | torch.device) -> "PackedBatch":
        """A copy with every tensor on `device`."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            document_ids=self.document_ids.to(device),
            targets=self.targets.to(device),
            output_mask=self.output_mask.to(device),
            values={name: value.to(device) for name, value in self.values.items()},
        )


def pack_prompt_output_batch(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    per_token: dict[str, Sequence[Sequence[float]]] | None = None,
    loss_masks: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """prompts[b] + outputs[b] for every b, concatenated in order; per_token[name][b] and loss_masks[b] (1: trained
    on, 0: a token a multi-turn episode put in; default all 1) have len(outputs[b]) entries."""
    per_token = per_token or {}
    lengths = np.asarray(prompt_output_lengths(prompts, outputs))
    tokens = np.concatenate([np.asarray(part, dtype=np.int64) for pair in zip(prompts, outputs) for part in pair])
    document_ids = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(tokens)) - np.repeat(starts, lengths)
    is_output_token = positions >= np.repeat([len(p) for p in prompts], lengths)
    # Shifting by one pairs each token with the next one in the row. Across a boundary that is the next
    # sequence's first token (or, at the end, the row's first token): a prompt token, so never trained on.
    targets = np.roll(tokens, -1)
    output_target = np.roll(is_output_token, -1)
    trained = is_output_token.copy()
    if loss_masks is not None:
        trained[is_output_token] = np.concatenate([np.asarray(m, dtype=bool) for m in loss_masks])
    output_mask = np.roll(trained, -1)
    values = {}
    for name, arrays in per_token.items():
        placed = np.zeros(len(tokens), dtype=np.float32)
        placed[output_target] = np.concatenate([np.asarray(a, dtype=np.float32) for a in arrays])
        values[name] = torch.from_numpy(placed)
    return PackedBatch(
        input_ids=torch.as_tensor(tokens, dtype=torch.long)[None],
        positions=torch.as_tensor(positions, dtype=torch.long)[None],
        document_ids=torch.as_tensor(document_ids, dtype=torch.long)[None],
        targets=torch.as_tensor(targets, dtype=torch.long),
        output_mask=torch.as_tensor(output_mask, dtype=torch.bool),
        values=values,
        document_lengths=tuple(int(length) for length in lengths),
    )


def split_into_minibatches(count: int, parts: int, seed: int) -> list[list[int]]:
    """Indices 0 .. count-1 in a random order drawn from `seed`, cut into `parts` minibatches whose sizes differ
    by at most one (the first ones are the larger; a minibatch is empty when count < parts). Each minibatch
    is then packed on its own, so the number of optimizer updates does not depend on the token budget and a
    minibatch mixes short and long sequences."""
    if parts < 1:
        raise ValueError(f"minibatches per step must be >= 1, got {parts}")
    order = np.random.default_rng(seed).permutation(count)
    return [[int(i) for i in part] for part in np.array_split(order, parts)]


def split_into_packs(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """First-fit decreasing: groups sequence indices into packs whose summed length stays within `token_budget`.

    Longest first, each into the first pack with room; a sequence longer than the budget gets a pack of its
    own. Every index appears exactly once; ties between equal lengths go to the lower index.
    """
    if token_budget < 1:
        raise ValueError(f"token budget must be >= 1, got {token_budget}")
    packs: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fitting = next((p for p, load in enumerate(loads) if load + lengths[index] <= token_budget), None)
        if fitting is None:
            packs.append([index])
            loads.append(lengths[index])
        else:
            packs[fitting].append(index)
            loads[fitting] += lengths[index]
    return packs


def balance_across_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Partitions sequence indices over `num_ranks` ranks so that the per-rank token sums are close to equal.

    Greedy longest-processing-time: longest first, each to the currently lightest rank (ties: lower length
    index first, then lower rank). Graham's bound: the heaviest rank is within 4/3 - 1/(3 num_ranks) of the
    optimum, and never above mean load + longest sequence (the last sequence placed on it went to the
    lightest rank, whose load was at most the mean). Returns num_ranks lists of ascending indices (a rank may
    get none when there are fewer sequences than ranks); every index appears exactly once.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    lightest = [(0, rank) for rank in range(num_ranks)]  # a heap of (load, rank)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, rank = heapq.heappop(lightest)
        ranks[rank].append(index)
        heapq.heappush(lightest, (load + lengths[index], rank))
    return [sorted(indices) for indices in ranks]
