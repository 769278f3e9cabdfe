"""Per-token logprobs under the temperature-scaled distribution, without materialising all fp32 logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from areal_async.packing import PackedBatch


def token_logprobs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """log softmax(hidden @ W^T / temperature)[target] per position.

    hidden: [N, hidden] (any leading shape, flattened), lm_head_weight: [vocab, hidden], targets: [N] int.
    Returns [N] fp32. Logits are formed `chunk_size` rows at a time, so peak memory is chunk_size x vocab.
    """
    lead_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size] @ lm_head_weight.T).float() / temperature
        picked = logits.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, dim=-1))
    if not out:
        return torch.zeros(lead_shape, dtype=torch.float32, device=hidden.device)
    return torch.cat(out).reshape(lead_shape)


def sequence_logprobs(model, input_ids: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each next token: input_ids/valid [B, T] -> [B, T-1], entry t scores input_ids[:, t+1]."""
    hidden = model.hidden_states(input_ids, valid)
    return token_logprobs(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:], temperature)


def packed_sequence_logprobs(model, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each packed token's next token in its own sequence: [N], entry t scores batch.targets[t]
    (meaningful where batch.output_mask, or anywhere but a sequence's last token). Attention never crosses
    a sequence boundary."""
    hidden = model.hidden_states(batch.input_ids, positions=batch.positions, document_ids=batch.document_ids)
    return token_logprobs(hidden[0], model.lm_head.weight, batch.targets, temperature)
