"""The decode step's draw as one Triton kernel (CUDA; on a CPU under TRITON_INTERPRET=1 for tests): what
actors/sampling.py's `sample` computes without top-k/top-p truncation, reading the logits twice instead of
writing and reading fp32 copies of them several times.

One program per row. Pass 1 keeps, lane by lane, a running max and sum of exp(logit / T - max) (and, greedy,
the first index of the max); pass 2 walks the vocabulary in order with a running prefix sum of exp(logit / T -
max) and takes the first token whose prefix sum exceeds u x (the total): the inverse-CDF draw of `sample`, so a
request's uniform stream gives the same tokens up to the rounding of the sums. The behaviour logprob is
logit[token] / T - logsumexp(logits / T) (T = 1 when greedy), before any truncation, as the learner recomputes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _draw_kernel(logits_ptr, row_stride, uniform_ptr, token_ptr, logprob_ptr, vocab, temperature,
                 GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    lanes = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_sum = tl.zeros([BLOCK], dtype=tl.float32)
    lane_best = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        index = start + lanes
        x = tl.load(base + index, mask=index < vocab, other=float("-inf")).to(tl.float32) / temperature
        if GREEDY:
            lane_best = tl.where(x > lane_max, index, lane_best)
        new_max = tl.maximum(lane_max, x)
        seen = new_max > float("-inf")
        lane_sum = tl.where(seen, lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max), 0.0)
        lane_max = new_max
    top = tl.max(lane_max, 0)
    total = tl.sum(tl.where(lane_max > float("-inf"), lane_sum * tl.exp(lane_max - top), 0.0), 0)
    if GREEDY:
        token = tl.min(tl.where(lane_max == top, lane_best, vocab), 0)
    else:
        target = tl.load(uniform_ptr + row) * total
        token = vocab
        last = 0
        running = 0.0
        for start in range(0, vocab, BLOCK):
            index = start + lanes
            valid = index < vocab
            x = tl.load(base + index, mask=valid, other=float("-inf")).to(tl.float32) / temperature
            weight = tl.where(valid, tl.exp(x - top), 0.0)
            prefix = tl.cumsum(weight, 0) + running
            first = tl.min(tl.where((prefix > target) & valid, index, vocab), 0)
            token = tl.where(token == vocab, first, token)
            last = tl.maximum(last, tl.max(tl.where(weight > 0, index, 0), 0))
            running += tl.sum(weight, 0)
        token = tl.where(token == vocab, last, token)  # the target fell past the last prefix by rounding
    chosen = tl.load(base + token).to(tl.float32) / temperature
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, chosen - top - tl.log(total))


@torch.compiler.disable  # a kernel launch: eager inside the compiled decode step
def fused_sample(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, unit stride along V), uniform [B] fp32 -> (tokens [B] long, behaviour
    logprobs [B] fp32): `sample` with no truncation; greedy (argmax, logprob at T = 1) when temperature <= 0."""
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    greedy = temperature <= 0
    _draw_kernel[(batch,)](logits, logits.stride(0), uniform, tokens, logprobs, vocab,
                           1.0 if greedy else float(temperature), GREEDY=greedy, BLOCK=BLOCK, num_warps=8)
    return tokens, logprobs
