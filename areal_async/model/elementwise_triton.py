"""The decoder's elementwise work between its matrix products as Triton kernels, for eager inference (CUDA; on a
CPU under TRITON_INTERPRET=1 for tests): RMSNorm with the residual add before it, SiLU(gate) x up, and RoPE.

Each reads its inputs once and writes its outputs once, where the eager ops write and read fp32 copies several
times (RMSNorm alone is eight kernels eagerly). They compute what areal_async/model/decoder.py computes, in the
same order and dtypes (fp32 arithmetic, rounded to the activations' dtype where the eager ops round), so their
results equal the eager ones up to the order of the RMSNorm's sum. `CausalLM.use_elementwise_kernels` turns them
on for a model's no-grad forwards outside torch.compile (which fuses these itself); training never uses them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, width, stride_x, stride_residual, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    valid = columns < width
    x = tl.load(x_ptr + row * stride_x + columns, mask=valid, other=0.0)
    if ADD:  # the residual stream: (x + residual) rounded to the activations' dtype, as the eager add
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_residual + columns, mask=valid,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * width + columns, x, mask=valid)
    value = x.to(tl.float32)
    inverse = tl.rsqrt(tl.sum(value * value, 0) / width + eps)
    normed = (value * inverse).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + columns, (weight * normed).to(out_ptr.dtype.element_ty), mask=valid)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., width] (unit stride along width), weight [width] -> (weight * RMSNorm(s), s) where s = x, or with
    `residual` (x's shape) s = x + residual rounded to x's dtype. The first output has the dtype of weight * x."""
    width = x.shape[-1]
    rows = x.numel() // width
    flat = x.reshape(rows, width)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        summed, flat_residual = x, flat
    else:
        flat_residual = residual.reshape(rows, width)
        summed = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rms_norm_kernel[(rows,)](flat, flat_residual, weight, out, summed, width, flat.stride(0), flat_residual.stride(0),
                              eps, ADD=residual is not None, BLOCK=triton.next_power_of_2(width),
                              num_warps=4 if width <= 2048 else 8)
    return out, summed


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, stride_gate, stride_up, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    columns = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = columns < width
    gate = tl.load(gate_ptr + row * stride_gate + columns, mask=valid, other=0.0)
    up = tl.load(up_ptr + row * stride_up + columns, mask=valid, other=0.0)
    value = gate.to(tl.float32)
    silu = (value / (1.0 + tl.exp(-value))).to(gate.dtype)  # F.silu rounds to the input dtype
    tl.store(out_ptr + row * width + columns, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=valid)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., width] (unit stride along width; views into one fused projection are fine) ->
    F.silu(gate) * up, contiguous, in their dtype."""
    width = gate.shape[-1]
    rows = gate.numel() // width
    gate_rows, up_rows = gate.reshape(rows, width), up.reshape(rows, width)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(width))
    _silu_mul_kernel[(triton.cdiv(width, block), rows)](gate_rows, up_rows, out, width, gate_rows.stride(0),
                                                        up_rows.stride(0), BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, seq, stride_xb, stride_xh, stride_xt, stride_cb,
                 stride_ct, HEAD_DIM: tl.constexpr, HEADS_BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    batch, position = token // seq, token % seq
    head = tl.arange(0, HEADS_BLOCK)
    dim = tl.arange(0, HEAD_DIM)
    valid = (head < heads)[:, None]
    base = x_ptr + batch * stride_xb + position * stride_xt + head[:, None] * stride_xh
    x = tl.load(base + dim[None, :], mask=valid, other=0.0)
    partner = tl.load(base + ((dim + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=valid, other=0.0)
    rotated = tl.where(dim[None, :] < HEAD_DIM // 2, -partner.to(tl.float32), partner.to(tl.float32))
    angle = batch * stride_cb + position * stride_ct + dim
    cos = tl.load(cos_ptr + angle)
    sin = tl.load(sin_ptr + angle)
    out = (x.to(tl.float32) * cos[None, :] + rotated * sin[None, :]).to(x.dtype)
    tl.store(out_ptr + (token * heads + head[:, None]) * HEAD_DIM + dim[None, :], out, mask=valid)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """decoder.apply_rope for x [B, H, T, D] (any strides, unit along D) and fp32 cos, sin [B, 1, T, D] (unit
    stride along D): the rotated x, same shape and dtype, laid out as [B, T, H, D] (then transposed), the layout
    the projections produce."""
    batch, heads, seq, head_dim = x.shape
    out = torch.empty(batch, seq, heads, head_dim, dtype=x.dtype, device=x.device)
    cos, sin = cos.expand(batch, 1, seq, head_dim), sin.expand(batch, 1, seq, head_dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    _rope_kernel[(batch * seq,)](x, cos, sin, out, heads, seq, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                                 cos.stride(2), HEAD_DIM=head_dim, HEADS_BLOCK=triton.next_power_of_2(heads),
                                 num_warps=4)
    return out.transpose(1, 2)
