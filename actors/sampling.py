"""Token sampling as pure functions: temperature, top-k / top-p truncation, Gumbel-max draws."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy decoding; top_k = 0 and top_p = 1 disable truncation."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def scaled_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [B, V] -> log softmax(logits / T) in fp32 (T <= 0, greedy, scores at T = 1).

    This is the distribution the behaviour logprobs are recorded under, before any truncation, so the
    learner can recompute exactly the same quantity.
    """
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1)


def truncate(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets to -inf every token outside the top-k and outside the smallest top-p nucleus. [B, V] -> [B, V]."""
    if top_k > 0 and top_k < logprobs.shape[-1]:
        kth = torch.topk(logprobs, top_k, dim=-1).values[:, -1:]
        logprobs = logprobs.masked_fill(logprobs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = logprobs.masked_fill(drop, float("-inf"))
    return logprobs


def draw(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Samples one token per row from the (truncated) distribution; greedy when temperature <= 0. -> [B]."""
    if params.temperature <= 0:
        return logprobs.argmax(-1)
    truncated = truncate(logprobs, params.top_k, params.top_p)
    uniform = torch.rand(truncated.shape, generator=generator, device=truncated.device).clamp_(min=1e-20)
    return (truncated - torch.log(-torch.log(uniform))).argmax(-1)
