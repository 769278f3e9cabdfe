"""The paged KV cache's decode attention as Triton kernels (CUDA; on a CPU under TRITON_INTERPRET=1 for tests).

One query token per sequence attends to the sequence's own cached keys and values, read block by block through
its block table, and to its own new key and value, which the kernel also writes into the cache. The query and
the new key arrive before RoPE, as views into the projection's output: the kernel rotates them with the
model's own cos/sin rows (no copies, no separate RoPE kernels). The work is
split three ways: one program per (sequence, key/value head, split), where a split is a run of consecutive
blocks of the sequence: its blocks spread evenly over `spread` splits, at most `split_blocks` blocks each (a
short row in a small batch still makes several programs, a long one runs of split_blocks). A program reads each
key/value tile once for the whole group of query heads
that share the key/value head (GROUP rows of one matrix product, padded to 16), keeps an online softmax, and
writes a partial result (its running max, sum and weighted values); a second kernel combines a sequence's
splits. Programs whose split starts past their sequence's last block do nothing, so the grid (splits of the
longest possible sequence) is fixed and the launch can live in a CUDA graph while lengths change.

Cache layout (one layer): [blocks, block_size, kv_heads, head_dim]. Block tables: [rows, width] int32. The new
key/value of row b goes to position lengths[b]; split 0 owns that term, so it is counted once. Inactive rows
read and write nothing (their output is their own value, unused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SINGLE_SPLIT_PARTIALS = 0  # no scratch when one split covers every sequence


@triton.jit
def _rotated(ptr, rows, dim, cos, sin, mask, HEAD_DIM: tl.constexpr):
    """RoPE (half-split pairs i, i + D/2) of the rows at `ptr + rows`, in fp32 then rounded to the input dtype, as
    decoder.apply_rope computes it."""
    x = tl.load(ptr + rows[:, None] + dim[None, :], mask=mask, other=0.0)
    partner = tl.load(ptr + rows[:, None] + ((dim + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=mask, other=0.0)
    rotated = tl.where(dim[None, :] < HEAD_DIM // 2, -partner.to(tl.float32), partner.to(tl.float32))
    return (x.to(tl.float32) * cos[None, :] + rotated * sin[None, :]).to(x.dtype)


@triton.jit
def _run_blocks(n_blocks, split_blocks, spread):
    """Blocks per split of a row of `n_blocks` blocks: spread evenly over `spread` splits, at most split_blocks."""
    return tl.minimum(split_blocks, tl.maximum(1, tl.cdiv(n_blocks, spread)))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, key_cache_ptr, value_cache_ptr, tables_ptr, lengths_ptr,
    active_ptr, out_ptr, partial_acc_ptr, partial_stats_ptr,
    scale, table_width, split_blocks, spread, splits,
    stride_q, stride_k, stride_v, stride_rope, stride_block, stride_token,
    HEADS_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SINGLE: tl.constexpr, PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    active = tl.load(active_ptr + row) != 0
    length = tl.where(active, tl.load(lengths_ptr + row), 0).to(tl.int32)
    n_blocks = tl.cdiv(length, BLOCK_SIZE)
    run = _run_blocks(n_blocks, split_blocks, spread)
    first = split * run
    if (split == 0) | (first < n_blocks):
        group = tl.arange(0, GROUP_PAD)
        dim = tl.arange(0, HEAD_DIM)
        token = tl.arange(0, BLOCK_SIZE)
        in_group = group < GROUP
        cos = tl.load(cos_ptr + row * stride_rope + dim)
        sin = tl.load(sin_ptr + row * stride_rope + dim)
        q = _rotated(q_ptr, row * stride_q + (head * GROUP + group) * HEAD_DIM, dim, cos, sin, in_group[:, None],
                     HEAD_DIM)
        own_row = tl.full([1], 0, tl.int64) + row * stride_k + head * HEAD_DIM
        k_own = tl.reshape(_rotated(k_new_ptr, own_row, dim, cos, sin, tl.full([1, 1], 1, tl.int1), HEAD_DIM),
                           [HEAD_DIM])
        v_own = tl.load(v_new_ptr + row * stride_v + head * HEAD_DIM + dim)
        own_score = tl.sum(q.to(tl.float32) * k_own.to(tl.float32)[None, :], 1) * scale  # [GROUP_PAD]
        is_first = split == 0
        m = tl.where(is_first, own_score, float("-inf"))
        l = tl.where(is_first, 1.0, 0.0) + tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.where(is_first, 1.0, 0.0) * v_own.to(tl.float32)[None, :] + tl.zeros(
            [GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        last = tl.minimum(first + run, n_blocks)
        for block_index in range(first, last):
            block_id = tl.load(tables_ptr + row * table_width + block_index).to(tl.int64)
            offsets = block_id * stride_block + head * HEAD_DIM + token[:, None] * stride_token + dim[None, :]
            k = tl.load(key_cache_ptr + offsets)
            v = tl.load(value_cache_ptr + offsets)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_SIZE]
            position = block_index * BLOCK_SIZE + token
            scores = tl.where(position[None, :] < length, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        if is_first & active:  # the new token's key and value into the cache: a program that loads that
            # position's block (the last split) masks it out, whether it sees the old or the new value
            block_id = tl.load(tables_ptr + row * table_width + length // BLOCK_SIZE).to(tl.int64)
            target = block_id * stride_block + (length % BLOCK_SIZE) * stride_token + head * HEAD_DIM + dim
            tl.store(key_cache_ptr + target, k_own)
            tl.store(value_cache_ptr + target, v_own)
        out_rows = row * (HEADS_KV * GROUP * HEAD_DIM) + (head * GROUP + group) * HEAD_DIM
        if SINGLE:
            out = acc / l[:, None]
            tl.store(out_ptr + out_rows[:, None] + dim[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=in_group[:, None])
        else:
            part = (row * HEADS_KV + head) * splits + split
            tl.store(partial_acc_ptr + (part * GROUP_PAD + group)[:, None] * HEAD_DIM + dim[None, :], acc)
            tl.store(partial_stats_ptr + part * 2 * GROUP_PAD + group, m)
            tl.store(partial_stats_ptr + part * 2 * GROUP_PAD + GROUP_PAD + group, l)


@triton.jit
def _decode_combine_kernel(
    partial_acc_ptr, partial_stats_ptr, out_ptr, lengths_ptr, active_ptr, split_blocks, spread, splits,
    HEADS_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    head = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    active = tl.load(active_ptr + row) != 0
    length = tl.where(active, tl.load(lengths_ptr + row), 0).to(tl.int32)
    n_blocks = tl.cdiv(length, BLOCK_SIZE)
    used = tl.maximum(1, tl.cdiv(n_blocks, _run_blocks(n_blocks, split_blocks, spread)))
    group = tl.arange(0, GROUP_PAD)
    dim = tl.arange(0, HEAD_DIM)
    first_part = (row * HEADS_KV + head) * splits
    m_all = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    for split in range(0, used):
        m_all = tl.maximum(m_all, tl.load(partial_stats_ptr + (first_part + split) * 2 * GROUP_PAD + group))
    l_all = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for split in range(0, used):
        part = first_part + split
        weight = tl.exp(tl.load(partial_stats_ptr + part * 2 * GROUP_PAD + group) - m_all)
        l_all += tl.load(partial_stats_ptr + part * 2 * GROUP_PAD + GROUP_PAD + group) * weight
        acc += tl.load(partial_acc_ptr + (part * GROUP_PAD + group)[:, None] * HEAD_DIM + dim[None, :]) * weight[:, None]
    out = acc / l_all[:, None]
    q_rows = row * (HEADS_KV * GROUP * HEAD_DIM) + (head * GROUP + group) * HEAD_DIM
    tl.store(out_ptr + q_rows[:, None] + dim[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(group < GROUP)[:, None])


def decode_splits(table_width: int, split_blocks: int, spread: int = 1) -> int:
    """Programs per (row, key/value head): `spread`, or more where the widest block table holds more runs of
    `split_blocks` blocks."""
    return max(1, spread, -(-table_width // split_blocks))


def paged_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor, scale: float,
                           split_blocks: int, spread: int = 1, num_warps: int = 4,
                           num_stages: int = 2) -> torch.Tensor:
    """Decode attention over a paged cache, writing each active row's new key/value at position lengths[row].

    q [B, H, D]; k_new, v_new [B, Hkv, D], before RoPE (any row stride: views into the fused projection's
    output; heads and dims contiguous); cos, sin [B, D] fp32 (decoder.rope_cos_sin at each row's position);
    key_cache, value_cache [blocks, block_size, Hkv, D] (one layer); block_tables [B, width] int32; lengths [B]
    int64 (tokens cached before this one); active [B] bool. A row's blocks spread over `spread` programs, at
    most `split_blocks` blocks each (spread 1: runs of split_blocks). Returns [B, H, D] in q's dtype. Static
    shapes and no host synchronisation (CUDA-graph safe)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_new.shape[1]
    group = heads // kv_heads
    block_size = key_cache.shape[1]
    width = block_tables.shape[1]
    for name, tensor in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if tensor.stride(2) != 1 or tensor.stride(1) != head_dim:
            raise ValueError(f"{name} needs contiguous heads and dims, got strides {tensor.stride()}")
    splits = decode_splits(width, split_blocks, spread)
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    group_pad = max(16, triton.next_power_of_2(group))
    if splits == 1:
        partial_acc = partial_stats = out.new_empty(SINGLE_SPLIT_PARTIALS, dtype=torch.float32)
    else:
        partial_acc = torch.empty((batch, kv_heads, splits, group_pad, head_dim), dtype=torch.float32, device=q.device)
        partial_stats = torch.empty((batch, kv_heads, splits, 2, group_pad), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 models: exact products, not tf32
    _decode_split_kernel[(splits, kv_heads, batch)](
        q, k_new, v_new, cos, sin, key_cache, value_cache, block_tables, lengths, active, out, partial_acc,
        partial_stats, scale, width, split_blocks, spread, splits, q.stride(0), k_new.stride(0), v_new.stride(0),
        cos.stride(0), key_cache.stride(0), key_cache.stride(1),
        HEADS_KV=kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        SINGLE=splits == 1, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _decode_combine_kernel[(kv_heads, batch)](
            partial_acc, partial_stats, out, lengths, active, split_blocks, spread, splits,
            HEADS_KV=kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            num_warps=4,
        )
    return out
