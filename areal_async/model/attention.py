"""Attention for the decoder: the masks and layouts of padded and packed rows, and the kernels behind them.

Padded rows (generation, references) attend through SDPA with a bool mask. Packed rows (the learner: several
sequences back to back, attention never crossing a boundary) take, on CUDA, the kernel `cuda_packed_kernel`
picks from the learner's settings: the varlen flash kernel (`DocumentSpans`), cuDNN's fused attention over
documents grouped by length (`LengthGroups`), or flex_attention with a document BlockMask; elsewhere one dense
causal SDPA per distinct document length. The fused kernels are custom ops (`fused_attention_op`), so the
compiled decoder layers trace through them.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from areal_async.config import PackedAttentionConfig, PackedAttentionKernel


def attention_mask(query_valid: torch.Tensor, key_valid: torch.Tensor, query_offset: int) -> torch.Tensor:
    """Causal mask over padded rows.

    query_valid: [B, Tq] bool, key_valid: [B, Tk] bool, queries sit at key slots query_offset .. query_offset+Tq-1.
    Returns [B, 1, Tq, Tk] bool. A padding query attends to its own slot only, so no row is empty (SDPA would
    return NaN) and padding never leaks into a real token.
    """
    tq, tk = query_valid.shape[1], key_valid.shape[1]
    device = key_valid.device
    query_slots = torch.arange(tq, device=device)[:, None] + query_offset
    key_slots = torch.arange(tk, device=device)[None, :]
    causal = key_slots <= query_slots  # [Tq, Tk]
    mask = causal[None] & key_valid[:, None, :] & query_valid[:, :, None]
    mask = mask | ((key_slots == query_slots)[None] & ~query_valid[:, :, None])
    return mask[:, None]


def document_block_mask(document_ids: torch.Tensor):
    """Causal attention within each document of packed rows (a query sees earlier keys of its own document
    only), as a flex-attention BlockMask: the kernel skips fully masked 128x128 blocks. document_ids: [B, T] int. Building it (uncompiled) holds a transient [B, 1, T, T] bool,
    once per forward: 256 MiB at T = 16K."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    batch, seq = document_ids.shape
    return create_block_mask(same_document_causal, batch, None, seq, seq, device=document_ids.device)


class DocumentSpans(NamedTuple):
    """Packed-mode layout for the varlen flash kernel: the rows' tokens flattened to [B * T], cu_seqlens
    [documents + 1] int32 the offsets where each document starts (and the total at the end), max_len the
    longest document."""

    cu_seqlens: torch.Tensor
    max_len: int


def _document_offsets(document_ids: torch.Tensor) -> torch.Tensor:
    """Where each document of packed rows starts in the flattened [B * T] tokens, with the total at the end:
    [documents + 1] int64 on the host (a document is a run of equal ids within a row). Reads the ids on the
    host (one device sync)."""
    batch, seq = document_ids.shape
    ids = document_ids.detach().to("cpu", torch.long)
    starts = torch.ones(batch, seq, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    offsets = starts.reshape(-1).nonzero().squeeze(-1)
    return torch.cat([offsets, torch.tensor([batch * seq])])


def document_spans(document_ids: torch.Tensor, offsets: torch.Tensor | None = None) -> DocumentSpans:
    """DocumentSpans of packed rows: a document is a run of equal ids within a row. document_ids: [B, T] int;
    offsets: their `_document_offsets` if already read (else they are read here: one device sync)."""
    batch, seq = document_ids.shape
    cu_seqlens = _document_offsets(document_ids) if offsets is None else offsets
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if batch * seq else 0
    return DocumentSpans(cu_seqlens.to(torch.int32).to(document_ids.device, non_blocking=True), max_len)


def cuda_packed_kernel(lengths, dtype: torch.dtype | None, head_dim: int | None,
                       settings: PackedAttentionConfig) -> str:
    """Which kernel `settings` pick on CUDA for a pack with these document lengths (any iterable of ints) and
    attention inputs of this dtype and head size: "cudnn", "flash" or "flex"."""
    kernel = settings.kernel
    fused_ok = dtype in (torch.bfloat16, torch.float16) and head_dim is not None and head_dim % 8 == 0 \
        and head_dim <= 256
    if kernel is PackedAttentionKernel.flex or not fused_ok:
        return "flex"
    if kernel is PackedAttentionKernel.flash or head_dim > 128:
        return "flash"
    if kernel is PackedAttentionKernel.cudnn:
        return "cudnn"
    distinct = set(lengths)
    few_long_lengths = (bool(distinct) and len(distinct) <= settings.cudnn_max_lengths
                        and min(distinct) >= settings.cudnn_min_length)
    return "cudnn" if few_long_lengths else "flash"


def offsets_from_lengths(document_ids: torch.Tensor, document_lengths) -> torch.Tensor | None:
    """`_document_offsets` of packed rows whose documents' lengths (in token order) the host already knows:
    their running sum, without reading document_ids back from the device. None without lengths."""
    if document_lengths is None:
        return None
    if sum(document_lengths) != document_ids.numel() or min(document_lengths, default=1) < 1:
        raise ValueError(f"document_lengths sum to {sum(document_lengths)}, not the {document_ids.numel()} tokens")
    return torch.tensor([0, *itertools.accumulate(document_lengths)], dtype=torch.long)


def packed_attention_mask(
    document_ids: torch.Tensor, dtype: torch.dtype | None = None, head_dim: int | None = None,
    document_lengths=None, settings: PackedAttentionConfig | None = None,
):
    """The packed-mode mask for `attend`, built once per forward and shared by all layers.
    document_ids: [B, T] int; dtype, head_dim: the attention inputs' dtype and head size; document_lengths:
    the documents' lengths in token order if the host knows them (else document_ids are read back: a device
    sync); settings: the kernel choice (default: PackedAttentionConfig()).

    On CUDA, as `cuda_packed_kernel` picks: LengthGroups with the cuDNN kernel, DocumentSpans for the varlen
    flash kernel, or a flex BlockMask. Elsewhere LengthGroups with the SDPA kernel (one dense causal SDPA per
    distinct document length)."""
    settings = settings or PackedAttentionConfig()
    offsets = offsets_from_lengths(document_ids, document_lengths)
    if not document_ids.is_cuda:
        return document_length_groups(document_ids, offsets=offsets)
    if cuda_packed_kernel((), dtype, head_dim, settings) == "flex":
        return document_block_mask(document_ids)
    if offsets is None:
        offsets = _document_offsets(document_ids)
    kernel = cuda_packed_kernel((offsets[1:] - offsets[:-1]).tolist(), dtype, head_dim, settings)
    if kernel == "cudnn":
        return document_length_groups(document_ids, kernel="cudnn", offsets=offsets,
                                      repeat_kv=settings.cudnn_repeat_kv)
    return document_spans(document_ids, offsets)


class LengthGroups(NamedTuple):
    """Packed-mode layout as dense batches: the documents of each distinct length attend as one dense causal
    batch. order: [tokens] the flattened token positions grouped by document length, or None where the pack
    is in that order already; inverse: its inverse permutation (None with order); groups: (documents, length)
    per group, in that order; kernel: "sdpa" (F.scaled_dot_product_attention, any device) or "cudnn"
    (`cudnn_causal_attention`, CUDA); repeat_kv: cuDNN gets the key/value heads repeated to the query heads."""

    order: torch.Tensor | None
    inverse: torch.Tensor | None
    groups: tuple[tuple[int, int], ...]
    kernel: str = "sdpa"
    repeat_kv: bool = False


def document_length_groups(
    document_ids: torch.Tensor, kernel: str = "sdpa", offsets: torch.Tensor | None = None, repeat_kv: bool = False,
) -> LengthGroups:
    """LengthGroups of packed rows (documents are runs of equal ids within a row). document_ids: [B, T];
    offsets: their `_document_offsets` if already read."""
    cu_seqlens = _document_offsets(document_ids) if offsets is None else offsets
    starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        by_length.setdefault(length, []).append(start)
    groups = tuple((len(group_starts), length) for length, group_starts in sorted(by_length.items()))
    # The documents (contiguous, in order) are already grouped when their lengths never decrease (equal
    # lengths, say): no permutation (decided per document, not per token: host time at the start of a step).
    if all(a <= b for a, b in zip(lengths, lengths[1:])):
        return LengthGroups(None, None, groups, kernel, repeat_kv)
    order = [start + offset for length, group_starts in sorted(by_length.items()) for start in group_starts
             for offset in range(length)]
    order_t = torch.tensor(order, dtype=torch.long, device=document_ids.device)
    return LengthGroups(order_t, torch.argsort(order_t), groups, kernel, repeat_kv)


def attention_by_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: LengthGroups) -> torch.Tensor:
    """Causal attention within each document, q [N, H, D], k, v [N, Hkv, D] -> [N, H, D]: one dense call per
    distinct document length (SDPA or cuDNN, as layout.kernel says) instead of an N x N mask."""
    if layout.order is not None:
        q, k, v = (t.index_select(0, layout.order) for t in (q, k, v))
    outputs, offset = [], 0
    for documents, length in layout.groups:
        rows = slice(offset, offset + documents * length)
        if layout.kernel == "cudnn":
            outputs.append(cudnn_causal_attention(q[rows], k[rows], v[rows], documents, length, layout.repeat_kv))
        else:
            q_g, k_g, v_g = (_as_documents(t[rows], documents, length) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q_g, k_g, v_g, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            outputs.append(out.transpose(1, 2).reshape(documents * length, q.shape[1], q.shape[2]))
        offset += documents * length
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out if layout.inverse is None else out.index_select(0, layout.inverse)


def fused_attention_op(name: str, extra_schema: str, forward_impl, backward_impl, forward_fake):
    """Registers a fused attention kernel as a pair of custom ops, `areal_async::<name>_forward` and
    `_backward`, with fake (shape) implementations and autograd, so torch.compile traces through it, and
    returns the forward op.

    forward (q, k, v, *extra) -> (out [like q], logsumexp) runs `forward_impl`; backward (grad_out, q, k, v,
    out, logsumexp, *extra) -> (dq, dk, dv) runs `backward_impl`. `extra_schema` declares the extra arguments
    ("Tensor cu_seqlens, SymInt max_len"): tensors among them are saved for backward, the rest kept as they
    are. `forward_fake` gives the forward's output shapes; the backward's are q's, k's and v's. Outputs are
    made contiguous: the layouts the fakes promise."""
    forward = torch.library.custom_op(
        f"areal_async::{name}_forward", lambda *args: tuple(t.contiguous() for t in forward_impl(*args)),
        mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, {extra_schema}) -> (Tensor, Tensor)",
    )
    backward = torch.library.custom_op(
        f"areal_async::{name}_backward", lambda *args: tuple(t.contiguous() for t in backward_impl(*args)),
        mutates_args=(),
        schema=f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {extra_schema}) "
               "-> (Tensor, Tensor, Tensor)",
    )
    forward.register_fake(forward_fake)
    backward.register_fake(lambda grad_out, q, k, v, *rest: (torch.empty_like(q), torch.empty_like(k),
                                                               torch.empty_like(v)))

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, *extra = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *(e for e in extra if isinstance(e, torch.Tensor)))
        ctx.extra = [None if isinstance(e, torch.Tensor) else e for e in extra]  # None: a saved tensor

    def backward_rule(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        saved = iter(saved)
        extra = [next(saved) if e is None else e for e in ctx.extra]
        dq, dk, dv = backward(grad_out.contiguous(), q, k, v, out, lse, *extra)
        return dq, dk, dv, *(None for _ in extra)

    forward.register_autograd(backward_rule, setup_context=setup_context)
    return forward


def _as_documents(t: torch.Tensor, documents: int, length: int) -> torch.Tensor:
    """[documents * length, heads, dim] -> [documents, heads, length, dim], a view (no copy)."""
    return t.view(documents, length, t.shape[1], t.shape[2]).transpose(1, 2)


def _cudnn_causal_forward_impl(q, k, v, documents, length):
    """cuDNN's fused causal attention over `documents` documents of `length` tokens each, packed back to back:
    q [documents * length, H, D], k, v [documents * length, Hkv, D] (grouped-query heads as they are) ->
    (out [documents * length, H, D], logsumexp [documents, H, length, 1] fp32). cuDNN takes the strided
    [documents, heads, length, dim] views and writes its output in q's memory layout, so no copies."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _as_documents(q, documents, length), _as_documents(k, documents, length),
        _as_documents(v, documents, length), None, True, 0.0, True, False,
    )[:2]
    return out.transpose(1, 2).reshape(q.shape), lse


def _cudnn_causal_backward_impl(grad_out, q, k, v, out, lse, documents, length):
    """Gradients (dq, dk, dv) of `_cudnn_causal_forward_impl`, in the packed layout. Without dropout the
    kernel reads no seed or offset: it gets placeholders; no bias, no nested offsets."""
    unused = torch.zeros((), dtype=torch.int64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *(_as_documents(t, documents, length) for t in (grad_out, q, k, v, out)), lse, unused, unused,
        None, None, None, length, length, 0.0, True,
    )
    return tuple(g.transpose(1, 2).reshape(t.shape) for g, t in zip(grads, (q, k, v)))


def _cudnn_causal_forward_fake(q, k, v, documents, length):
    return torch.empty_like(q), q.new_empty((documents, q.shape[1], length, 1), dtype=torch.float32)


_cudnn_causal_forward = fused_attention_op(
    "cudnn_causal", "SymInt documents, SymInt length",
    lambda *args: _cudnn_causal_forward_impl(*args), lambda *args: _cudnn_causal_backward_impl(*args),
    _cudnn_causal_forward_fake,
)


def cudnn_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: int, length: int, repeat_kv: bool = False
) -> torch.Tensor:
    """Causal attention within each of `documents` documents of `length` tokens, packed back to back:
    q [documents * length, H, D], k, v [documents * length, Hkv, D] -> [documents * length, H, D], through
    cuDNN's fused attention (CUDA, bf16/fp16). repeat_kv: repeat the key/value heads to the query heads first
    (for a cuDNN build that rejects grouped-query shapes)."""
    if repeat_kv and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out, _ = _cudnn_causal_forward(q.contiguous(), k.contiguous(), v.contiguous(), documents, length)
    return out


def _flash_varlen_forward_impl(q, k, v, cu_seqlens, max_len):
    """Causal varlen flash attention (aten's flash kernel, GQA native): q [N, H, D], k, v [N, Hkv, D] ->
    (out [N, H, D], logsumexp)."""
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False
    )[:2]
    return out, lse


def _flash_varlen_backward_impl(grad_out, q, k, v, out, lse, cu_seqlens, max_len):
    """Gradients (dq, dk, dv) of `_flash_varlen_forward_impl`. Without dropout the kernel reads no RNG state:
    it gets placeholders."""
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, rng_state, unused
    )
    return dq, dk, dv


def _flash_varlen_forward_fake(q, k, v, cu_seqlens, max_len):
    # aten's own shape function (its logsumexp layout differs between torch versions and platforms)
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False
    )[:2]
    return torch.empty_like(q), torch.empty_like(lse)


_flash_varlen_forward = fused_attention_op(
    "flash_varlen", "Tensor cu_seqlens, SymInt max_len",
    lambda *args: _flash_varlen_forward_impl(*args), lambda *args: _flash_varlen_backward_impl(*args),
    _flash_varlen_forward_fake,
)


def packed_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: DocumentSpans) -> torch.Tensor:
    """Causal attention within each document of packed tokens: q [N, H, D], k, v [N, Hkv, D] -> [N, H, D]."""
    out, _ = _flash_varlen_forward(q.contiguous(), k.contiguous(), v.contiguous(), spans.cu_seqlens, spans.max_len)
    return out


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process, on first use, so CPU runs never import or compile it.

    Default (automatic) dynamic shapes: the first pack length compiles a static kernel, a second length
    recompiles once with a symbolic length, so varying pack lengths do not recompile per length.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, enable_gqa: bool) -> torch.Tensor:
    """Attention of q: [B, H, Tq, D] over k, v: [B, Hkv, Tk, D] -> [B, H, Tq, D].

    mask: a bool tensor [B, 1, Tq, Tk] (SDPA, any device) or a flex BlockMask (from `packed_attention_mask`;
    its DocumentSpans go through `packed_flash_attention` instead, in a [tokens, heads, dim] layout).
    """
    if torch.is_tensor(mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
