"""Per-token logprobs under the temperature-scaled distribution, without materialising all fp32 logits.

`token_logprobs` runs the LM head chunk by chunk inside one autograd Function: forward keeps only each row's
logsumexp (fp32, [N]); backward forms each chunk's logits again, turns them into the chunk's logit gradient
and multiplies it out into the hidden-state and weight gradients before the next chunk. Neither pass keeps
more than one chunk of logits alive, and nothing of size rows x vocab is saved for backward.

On CUDA the elementwise work on a chunk (upcast, temperature, logsumexp, gather; in backward the softmax and
the one-hot difference) runs as one compiled kernel reading the low-precision logits once. Elsewhere it runs
eagerly in the same order of operations as a plain `log_softmax(...)[target]` over the chunk.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from areal_async.config import LearnerConfig
    from areal_async.packing import PackedBatch

# Rows of logits formed at a time. On CUDA a chunk is kept in the matmul's dtype (bf16 under FSDP):
# 4096 x 151,936 x 2 bytes = 1.2 GiB, two of them at the peak of backward (logits and their gradient).
DEFAULT_CHUNK_ROWS = 1024
CUDA_CHUNK_ROWS = 4096


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (bf16/fp16 -> fp32; fp32 and fp64 unchanged)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_logprobs_eager(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """logits [c, V] (any float dtype), targets [c] -> (logprob of target [c], logsumexp [c]), both in at least
    fp32."""
    scaled = _upcast(logits) / temperature
    picked = scaled.gather(-1, targets[:, None]).squeeze(-1)
    lse = torch.logsumexp(scaled, dim=-1)
    return picked - lse, lse


def _chunk_logit_grad_eager(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, temperature: float
) -> torch.Tensor:
    """d(sum_i grad_out_i * logprob_i) / d logits for one chunk: grad_out * (onehot(target) - softmax) / T, in
    the dtype of `logits`."""
    probs = torch.exp(_upcast(logits) / temperature - lse[:, None])
    grad = probs.mul_(-grad_out[:, None])
    grad.scatter_add_(-1, targets[:, None], grad_out[:, None].to(grad.dtype))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad.to(logits.dtype)


def _chunk_logit_grad_fusable(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The same as `_chunk_logit_grad_eager`, written as one elementwise expression for the compiler."""
    probs = torch.exp(_upcast(logits) / temperature - lse[:, None])
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = vocab[None, :] == targets[:, None]
    return ((onehot.to(probs.dtype) - probs) * (grad_out[:, None] / temperature)).to(logits.dtype)


@functools.cache
def _compiled_chunk_kernels():
    """The chunk functions compiled once per process, on first CUDA use (CPU runs never compile them)."""
    return torch.compile(_chunk_logprobs_eager), torch.compile(_chunk_logit_grad_fusable)


def _chunk_kernels(device: torch.device):
    if device.type == "cuda":
        return _compiled_chunk_kernels()
    return _chunk_logprobs_eager, _chunk_logit_grad_eager


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> log softmax(hidden @ weight^T / T)[target], fp32 [N].

    The head computes in hidden's dtype (the weight is cast to it: an fp32 master weight under bf16 autocast).
    Saves hidden, the cast weight, targets and the per-row logsumexp; backward recomputes each chunk's logits,
    unless `keep_logits`: then forward writes every chunk's logits (low precision) into one [N, V] buffer that
    backward reads instead. The weight's gradient is summed over the chunks in fp32 (at least), whatever the
    compute dtype: a bf16 running sum lost more with every chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_size: int, keep_logits: bool):
        forward_chunk, _ = _chunk_kernels(hidden.device)
        rows = hidden.shape[0]
        ctx.weight_dtype = weight.dtype
        weight = weight.to(hidden.dtype)
        logits_dtype = hidden.dtype
        dtype = torch.promote_types(logits_dtype, torch.float32)
        out = torch.empty(rows, dtype=dtype, device=hidden.device)
        lse = torch.empty(rows, dtype=dtype, device=hidden.device)
        kept = torch.empty(rows, weight.shape[0], dtype=logits_dtype, device=hidden.device) if keep_logits else None
        for start in range(0, rows, chunk_size):
            end = min(rows, start + chunk_size)
            if kept is None:
                logits = hidden[start:end] @ weight.T
            else:
                logits = torch.mm(hidden[start:end], weight.T, out=kept[start:end])
            out[start:end], lse[start:end] = forward_chunk(logits, targets[start:end], temperature)
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, kept)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse, kept = ctx.saved_tensors
        _, grad_chunk = _chunk_kernels(hidden.device)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.to(lse.dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                      device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(hidden.shape[0], start + ctx.chunk_size)
            rows = hidden[start:end]
            logits = rows @ weight.T if kept is None else kept[start:end]
            grad_logits = grad_chunk(logits, targets[start:end], lse[start:end], grad_out[start:end], ctx.temperature)
            del logits
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight and grad_logits.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.T, rows)
            elif need_weight:  # the chunk's product is rounded once; the sum over chunks is not
                grad_weight.add_(grad_logits.T @ rows)
            del grad_logits
        if need_weight:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    keep_logits_gib: float = 0.0,
) -> torch.Tensor:
    """log softmax(hidden @ W^T / temperature)[target] per position.

    hidden: [N, hidden] (any leading shape, flattened), lm_head_weight: [vocab, hidden], targets: [N] int.
    Returns [N] fp32 (fp64 for fp64 inputs). Logits are formed `chunk_size` rows at a time (default: 4096 on
    CUDA, 1024 elsewhere), in forward and again in backward, so peak memory is about two chunks of logits and
    nothing of size N x vocab is kept for backward; except that low-precision (bf16/fp16) logits of at most
    `keep_logits_gib` GiB are kept from forward for backward when a gradient is wanted (one LM-head matmul
    fewer; fp32 logits are never kept: that would materialise them whole).

    The head computes in hidden's dtype; under autocast in the autocast dtype, as a Linear would (the Function's
    own matmuls are not autocast in backward, so hidden is cast here and the weight inside the Function, whose
    gradient then reaches an fp32 master weight in fp32).
    """
    lead_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] == 0:
        return torch.zeros(lead_shape, dtype=torch.float32, device=hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden = hidden.to(dtype)
    if chunk_size is None:
        chunk_size = CUDA_CHUNK_ROWS if hidden.is_cuda else DEFAULT_CHUNK_ROWS
    logits_dtype = hidden.dtype
    kept_gib = hidden.shape[0] * lm_head_weight.shape[0] * logits_dtype.itemsize / 2**30
    keep_logits = (
        logits_dtype.itemsize <= 2 and kept_gib <= keep_logits_gib and torch.is_grad_enabled()
        and (hidden.requires_grad or lm_head_weight.requires_grad)
    )
    with torch.autocast(device_type, enabled=False):
        out = _ChunkedTokenLogprobs.apply(
            hidden, lm_head_weight, targets, float(temperature), int(chunk_size), keep_logits
        )
    return out.reshape(lead_shape)


def sequence_logprobs(model, input_ids: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each next token: input_ids/valid [B, T] -> [B, T-1], entry t scores input_ids[:, t+1]."""
    hidden = model.hidden_states(input_ids, valid)
    return token_logprobs(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:], temperature)


def packed_sequence_logprobs(model, batch: PackedBatch, temperature: float = 1.0,
                             learner: LearnerConfig | None = None) -> torch.Tensor:
    """Logprob of each packed token's next token in its own sequence: [N], entry t scores batch.targets[t]
    (meaningful where batch.output_mask, or anywhere but a sequence's last token). Attention never crosses
    a sequence boundary. learner: the packed attention kernel and the kept-logits budget (default: none kept,
    the default kernel choice)."""
    hidden = model.hidden_states(batch.input_ids, positions=batch.positions, document_ids=batch.document_ids,
                                 document_lengths=batch.document_lengths,
                                 packed_attention=learner.packed_attention if learner else None)
    return token_logprobs(hidden[0], model.lm_head.weight, batch.targets, temperature,
                         keep_logits_gib=learner.keep_logits_gib if learner else 0.0)
