"""Token sampling as pure functions: temperature, top-k / top-p truncation, inverse-CDF draws.

A draw takes one uniform number per row: the token is where u * (kept probability mass) falls in the
cumulative distribution (a plain fp32 `cumsum` of exp(score - row max): an add scan, several times cheaper
on the device than a `logcumsumexp` scan, and as precise, since every term is <= 1 and the sum <= V). One
number per row, not one per vocabulary entry, is what lets the engine give every request its own
reproducible random stream and keep the draw inside a CUDA graph (the uniforms are data, not generator calls).
"""

from __future__ import annotations

import hashlib
import math
import random

import torch

from areal_async.types import SamplingParams


def scaled_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [B, V] -> log softmax(logits / T) in fp32 (T <= 0, greedy, scores at T = 1).

    This is the distribution the behaviour logprobs are recorded under, before any truncation, so the
    learner can recompute exactly the same quantity.
    """
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1)


@torch.compiler.disable  # a cumsum, as in _inverse_cdf below
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


def pick(scores: torch.Tensor, params: SamplingParams, uniform: torch.Tensor) -> torch.Tensor:
    """Samples one token per row. scores [B, V]: logits or logprobs already divided by the temperature (any
    per-row shift gives the same draw); uniform [B] in [0, 1). Greedy (argmax) when temperature <= 0. -> [B]."""
    if params.temperature <= 0:
        return scores.argmax(-1)
    return _inverse_cdf(truncate(scores, params.top_k, params.top_p), scores.amax(-1, keepdim=True), uniform)


# The scans (cumsum) stay out of torch.compile: inductor's triton scan fails to generate code for them with a
# dynamic batch size (torch 2.11, H100). Eager kernels inside the engine's CUDA graphs cost nothing extra.
@torch.compiler.disable
def _inverse_cdf(kept: torch.Tensor, top: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """kept [B, V] scores (-inf: truncated), top [B, 1] >= every kept score, uniform [B] -> tokens [B]."""
    cumulative = torch.exp(kept - top).cumsum(-1)  # the kept mass up to each token, relative to exp(top)
    total = cumulative[:, -1]
    # u * kept mass, kept strictly below the total: rounding must not step past the last kept token
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(uniform.to(cumulative.dtype) * total, below_total)
    # the token whose cumulative interval [C[i-1], C[i]) holds the target; truncated tokens have empty ones
    token = torch.searchsorted(cumulative, target.unsqueeze(-1), right=True).squeeze(-1)
    return token.clamp_(max=kept.shape[-1] - 1)


def sample(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), uniform [B] -> (tokens [B], their behaviour logprobs [B] in fp32).

    The logprob is log softmax(logits / T)[token] before truncation (T = 1 when greedy), as `scaled_logprobs`
    and the learner's recomputation define it, computed as scaled[token] - logsumexp(scaled) without writing
    out the full [B, V] log-softmax. Static shapes, no host sync: usable inside a CUDA graph."""
    scaled = logits.float()
    if params.temperature > 0 and params.temperature != 1.0:
        scaled = scaled / params.temperature
    top = scaled.amax(-1, keepdim=True)  # shared by the draw and the normaliser
    if params.temperature <= 0:
        token = scaled.argmax(-1)
    else:
        token = _inverse_cdf(truncate(scaled, params.top_k, params.top_p), top, uniform)
    normaliser = top.squeeze(-1) + torch.exp(scaled - top).sum(-1).log()  # logsumexp(scaled)
    logprob = scaled.gather(-1, token[:, None]).squeeze(-1) - normaliser
    return token, logprob


def draw(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Samples one token per row from the (truncated) distribution; greedy when temperature <= 0. -> [B]."""
    uniform = torch.rand(logprobs.shape[0], generator=generator, device=logprobs.device, dtype=torch.float64)
    return pick(logprobs, params, uniform)


def long_tailed_limit(mean: float, low: int, high: int, key: str) -> int:
    """A token limit drawn log-normal (sigma 1) with the given mean, clipped to [low, high], from its own
    stream seeded by `key`: the same key always gives the same limit, whatever else is drawn."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    draw = math.exp(math.log(mean) - 0.5 + random.Random(seed).gauss(0.0, 1.0))
    return int(min(high, max(low, round(draw))))
