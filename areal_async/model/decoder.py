"""One compact decoder for the Qwen2 / Llama family, shared by the learner and the built-in engine.

Parameter names follow Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`), so a
checkpoint folder loads with a plain `load_state_dict`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from areal_async.config import PackedAttentionConfig, PackedAttentionKernel


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "DecoderConfig":
        """Reads a Hugging Face `config.json` dict (Qwen2 or Llama)."""
        model_type = hf.get("model_type", "qwen2")
        if model_type not in ("qwen2", "llama"):
            raise ValueError(f"unsupported model_type {model_type!r}: expected 'qwen2' or 'llama'")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"unsupported rope type {rope_type!r}: only default RoPE is implemented")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in hf.items() if k in known}
        values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        values["attention_bias"] = bool(hf.get("attention_bias", model_type == "qwen2"))
        values["model_type"] = model_type
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        return cls(**values)

    def to_hf_dict(self) -> dict:
        hf = asdict(self)
        hf["architectures"] = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"]
        hf["hidden_act"] = "silu"
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": hf.pop("rope_theta")}
        if self.model_type == "qwen2":
            hf.pop("attention_bias")  # Qwen2 always has q/k/v biases
        return hf


@dataclass
class KVCache:
    """Static key/value slots for incremental decoding.

    keys, values: [layers, batch, kv_heads, max_len, head_dim]; valid: [batch, max_len] marks slots that hold
    a real (non-padding) token; length: slots filled so far (the same for every row).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, config: DecoderConfig, batch: int, max_len: int, dtype, device) -> "KVCache":
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    # The cache protocol of `CausalLM.hidden_states` (also implemented by `slot_cache.SlotKVCache`):
    def positions_and_mask(self, input_ids, valid, positions):
        """RoPE positions [B, T] and the attention mask of the next T tokens; marks their validity."""
        return CausalLM._padded_positions_and_mask(input_ids, valid, positions, self)

    def attention(self, layer_index: int, q, k, v, mask) -> torch.Tensor:
        """Appends k, v [B, Hkv, T, D] at slots length .. length+T-1; q [B, H, T, D] attends to all filled slots."""
        start, end = self.length, self.length + q.shape[2]
        self.keys[layer_index, :, :, start:end] = k
        self.values[layer_index, :, :, start:end] = v
        k, v = self.keys[layer_index, :, :, :end], self.values[layer_index, :, :, :end]
        return attend(q, k, v, mask, enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, tokens: int) -> None:
        self.length += tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] int -> cos, sin: [B, 1, T, head_dim] in fp32 (half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D] with cos, sin [B, 1, T, D] (or [B, T, H, D] with [B, T, 1, D]); rotates pairs
    (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, layer_index: int, kv_cache: KVCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        if isinstance(mask, (DocumentSpans, LengthGroups)):  # packed rows in a [tokens, heads, dim] layout
            q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, T, 1, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            tokens = batch * seq
            attention = packed_flash_attention if isinstance(mask, DocumentSpans) else attention_by_length
            out = attention(
                q.reshape(tokens, self.num_heads, self.head_dim),
                k.reshape(tokens, self.num_kv_heads, self.head_dim),
                v.reshape(tokens, self.num_kv_heads, self.head_dim),
                mask,
            )
            return self.o_proj(out.reshape(batch, seq, -1))
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # the cache stores k, v and runs the attention (KVCache or SlotKVCache)
            out = kv_cache.attention(layer_index, q, k, v, mask)
        else:
            out = attend(q, k, v, mask, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, layer_index, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_index, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask over packed rows: a query sees earlier keys of its own document only.

    document_ids: [B, T] int -> [B, 1, T, T] bool (O(T^2) memory). Every query sees itself, so no row is empty.
    """
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_document)[:, None]


def document_block_mask(document_ids: torch.Tensor):
    """The same mask as `document_causal_mask`, as a flex-attention BlockMask: the kernel skips fully masked
    128x128 blocks. document_ids: [B, T] int. Building it (uncompiled) holds a transient [B, 1, T, T] bool,
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


@torch.library.custom_op("areal_async::cudnn_causal_forward", mutates_args=())
def _cudnn_causal_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _cudnn_causal_forward_impl(q, k, v, documents, length)
    return out.contiguous(), lse.contiguous()  # the layouts the fake promises (no-ops for cuDNN's)


@_cudnn_causal_forward.register_fake
def _cudnn_causal_forward_fake(q, k, v, documents, length):
    return torch.empty_like(q), q.new_empty((documents, q.shape[1], length, 1), dtype=torch.float32)


@torch.library.custom_op("areal_async::cudnn_causal_backward", mutates_args=())
def _cudnn_causal_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, documents: int, length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _cudnn_causal_backward_impl(grad_out, q, k, v, out, lse, documents, length)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_cudnn_causal_backward.register_fake
def _cudnn_causal_backward_fake(grad_out, q, k, v, out, lse, documents, length):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _cudnn_causal_setup_context(ctx, inputs, output) -> None:
    q, k, v, documents, length = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.documents, ctx.length = documents, length


def _cudnn_causal_backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _cudnn_causal_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.documents, ctx.length)
    return dq, dk, dv, None, None


_cudnn_causal_forward.register_autograd(_cudnn_causal_backward_rule, setup_context=_cudnn_causal_setup_context)


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


@torch.library.custom_op("areal_async::flash_varlen_forward", mutates_args=())
def _flash_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _flash_varlen_forward_impl(q, k, v, cu_seqlens, max_len)
    return out.contiguous(), lse.contiguous()  # the layouts the fake promises (no-ops for the flash kernel's)


@_flash_varlen_forward.register_fake
def _flash_varlen_forward_fake(q, k, v, cu_seqlens, max_len):
    # aten's own shape function (its logsumexp layout differs between torch versions and platforms)
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False
    )[:2]
    return torch.empty_like(q), torch.empty_like(lse)


@torch.library.custom_op("areal_async::flash_varlen_backward", mutates_args=())
def _flash_varlen_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _flash_varlen_backward_impl(grad_out, q, k, v, out, lse, cu_seqlens, max_len)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_flash_varlen_backward.register_fake
def _flash_varlen_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, max_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_varlen_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_len = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_len = max_len


def _flash_varlen_backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_varlen_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_len)
    return dq, dk, dv, None, None


_flash_varlen_forward.register_autograd(_flash_varlen_backward_rule, setup_context=_flash_varlen_setup_context)


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


class CausalLM(nn.Module):
    """Decoder-only LM. forward(input_ids) -> logits [batch, seq, vocab]."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        document_lengths=None,
        packed_attention: PackedAttentionConfig | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden].

        input_ids: [B, T]; valid: [B, T] bool (False = padding; default all True); positions: [B, T] RoPE
        positions (default: count of valid tokens before each one, including the cache's). With kv_cache, the
        T tokens are appended at slots cache.length .. cache.length+T-1 and the cache's length advances (a
        KVCache; a `SlotKVCache` places each row's tokens and picks positions and mask itself).

        Packed mode: document_ids [B, T] int marks which sequence each token belongs to (several sequences
        concatenated in a row); attention is causal within a document and never crosses into another.
        `positions` must then be given (restarting at 0 for each document); valid and kv_cache must not be.
        document_lengths: the documents' lengths in token order, where the host knows them (a PackedBatch
        does): the attention layout is then built without reading document_ids back from the device.
        packed_attention: the packed mode's kernel choice on CUDA (default: PackedAttentionConfig()).
        """
        if document_ids is None and kv_cache is not None:
            positions, mask = kv_cache.positions_and_mask(input_ids, valid, positions)
        elif document_ids is None:
            positions, mask = self._padded_positions_and_mask(input_ids, valid, positions, None)
        else:
            if positions is None or valid is not None or kv_cache is not None:
                raise ValueError("packed mode (document_ids) needs positions, and takes no valid mask or kv_cache")
            mask = None
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        if mask is None:  # the attention inputs' dtype: autocast's where it is on (q/k/v come from Linears)
            device_type = x.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
            mask = packed_attention_mask(document_ids, dtype, self.config.head_dim, document_lengths,
                                         packed_attention)
        for index, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, index, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        return self.model.norm(x)

    @staticmethod
    def _padded_positions_and_mask(
        input_ids: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor | None, kv_cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded mode: RoPE positions [B, T] and attention mask [B, 1, T, cache.length+T]; marks the new
        slots' validity in the cache."""
        seq = input_ids.shape[1]
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        offset = 0
        if kv_cache is not None:
            offset = kv_cache.length
            kv_cache.valid[:, offset : offset + seq] = valid
            key_valid = kv_cache.valid[:, : offset + seq]
        else:
            key_valid = valid
        if positions is None:
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]
        return positions, attention_mask(valid, key_valid, offset)

    def forward(self, input_ids, valid=None, positions=None, kv_cache=None, document_ids=None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, valid, positions, kv_cache, document_ids))
