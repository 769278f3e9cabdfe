"""The decode step's draw as Triton kernels (CUDA; on a CPU under TRITON_INTERPRET=1 for tests): what
actors/sampling.py's `sample` computes without top-k/top-p truncation, reading the logits about once instead of
writing and reading fp32 copies of them several times.

Two kernels, so that a small batch still spreads over the GPU. Pass 1 has one program per (row, chunk of CHUNK
vocabulary positions): the chunk's max of logit / T, its sum of exp(logit / T - max) and (greedy) the first index
of its max. Pass 2 has one program per row: it combines the chunks into the row's max and total, finds the chunk
whose prefix sum of mass first exceeds u x (the total), and walks that chunk alone with a running prefix sum to
the first token past it: the inverse-CDF draw of `sample`, so a request's uniform stream gives the same tokens up
to the rounding of the sums. The behaviour logprob is logit[token] / T - logsumexp(logits / T) (T = 1 when
greedy), before any truncation, as the learner recomputes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 8192  # vocabulary positions per pass-1 program


@triton.jit
def _chunk_stats_kernel(logits_ptr, row_stride, stats_ptr, best_ptr, vocab, temperature, chunks,
                        GREEDY: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    index = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = index < vocab
    x = tl.load(logits_ptr + row * row_stride + index, mask=valid, other=float("-inf")).to(tl.float32) / temperature
    top = tl.max(x, 0)  # finite: every chunk holds a real position
    part = row * chunks + chunk
    tl.store(stats_ptr + part * 2, top)
    tl.store(stats_ptr + part * 2 + 1, tl.sum(tl.where(valid, tl.exp(x - top), 0.0), 0))
    if GREEDY:
        tl.store(best_ptr + part, tl.min(tl.where(x == top, index, vocab), 0))


@triton.jit
def _pick_kernel(logits_ptr, row_stride, stats_ptr, best_ptr, uniform_ptr, token_ptr, logprob_ptr, vocab,
                 temperature, chunks, GREEDY: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    lanes = tl.arange(0, CHUNKS)
    real = lanes < chunks
    chunk_max = tl.load(stats_ptr + (row * chunks + lanes) * 2, mask=real, other=float("-inf"))
    chunk_sum = tl.load(stats_ptr + (row * chunks + lanes) * 2 + 1, mask=real, other=0.0)
    top = tl.max(chunk_max, 0)
    mass = tl.where(real, chunk_sum * tl.exp(chunk_max - top), 0.0)
    total = tl.sum(mass, 0)
    if GREEDY:
        best = tl.load(best_ptr + row * chunks + lanes, mask=real, other=vocab)
        token = tl.min(tl.where(chunk_max == top, best, vocab), 0)
    else:
        target = tl.load(uniform_ptr + row) * total
        prefix = tl.cumsum(mass, 0)
        chosen = tl.min(tl.where((prefix > target) & real, lanes, chunks), 0)
        # the target fell past the last prefix by rounding: the last chunk with mass
        chosen = tl.where(chosen == chunks, tl.max(tl.where(mass > 0, lanes, 0), 0), chosen)
        before = tl.sum(tl.where(lanes < chosen, mass, 0.0), 0)
        index = chosen * CHUNK + tl.arange(0, CHUNK)
        valid = index < vocab
        x = tl.load(base + index, mask=valid, other=float("-inf")).to(tl.float32) / temperature
        weight = tl.where(valid, tl.exp(x - top), 0.0)
        running = tl.cumsum(weight, 0) + before
        token = tl.min(tl.where((running > target) & valid, index, vocab), 0)
        token = tl.where(token == vocab, tl.max(tl.where(weight > 0, index, 0), 0), token)
    chosen_logit = tl.load(base + token).to(tl.float32) / temperature
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, chosen_logit - top - tl.log(total))


@torch.compiler.disable  # kernel launches: eager inside the compiled decode step
def fused_sample(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, unit stride along V), uniform [B] fp32 -> (tokens [B] long, behaviour
    logprobs [B] fp32): `sample` with no truncation; greedy (argmax, logprob at T = 1) when temperature <= 0."""
    batch, vocab = logits.shape
    chunks = triton.cdiv(vocab, CHUNK)
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.long, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    stats = torch.empty(batch, chunks, 2, dtype=torch.float32, device=device)
    best = torch.empty(batch, chunks, dtype=torch.int32, device=device)
    greedy = temperature <= 0
    scale = 1.0 if greedy else float(temperature)
    _chunk_stats_kernel[(chunks, batch)](logits, logits.stride(0), stats, best, vocab, scale, chunks,
                                         GREEDY=greedy, CHUNK=CHUNK, num_warps=8)
    _pick_kernel[(batch,)](logits, logits.stride(0), stats, best, uniform, tokens, logprobs, vocab, scale, chunks,
                           GREEDY=greedy, CHUNK=CHUNK, CHUNKS=max(2, triton.next_power_of_2(chunks)), num_warps=8)
    return tokens, logprobs
