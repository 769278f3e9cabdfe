"""One compact decoder for the Qwen2 / Llama family, shared by the learner and the built-in engine.

Parameter names follow Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`), so a
checkpoint folder loads with a plain `load_state_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from areal_async.config import PackedAttentionConfig
from areal_async.model.attention import (
    DocumentSpans, LengthGroups, attend, attention_by_length, attention_mask, packed_attention_mask,
    packed_flash_attention,
)


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


class DecodeCache(Protocol):
    """A key/value cache `CausalLM.hidden_states` decodes with (the engine's `paged_cache.PagedKVCache`): it picks
    the new tokens' RoPE positions and attention mask, stores their keys and values and runs the attention."""

    def positions_and_mask(self, input_ids: torch.Tensor, valid, positions) -> tuple[torch.Tensor, Any]:
        """RoPE positions [B, T] of the next T tokens and the mask their attention takes."""

    def attention(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates q [B, H, T, D] and k [B, Hkv, T, D] with cos, sin [B, 1, T, D] (`apply_rope`), stores k, v of
        layer `layer_index`, and returns q's attention over the cached keys [B, H, T, D]."""

    def advance(self, tokens: int) -> None:
        """Called once per forward, after the last layer, with the T tokens it appended."""


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


def eager_inference() -> bool:
    """A no-grad forward outside torch.compile: where the elementwise Triton kernels may stand in for the ops
    (compiled code fuses the ops itself, and training needs their autograd)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


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
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see CausalLM.fuse_projections

    def _apply(self, fn, recurse=True):
        self.fused = None  # a conversion gives the parameters new storage: the fused copy would go stale
        return super()._apply(fn, recurse)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D]."""
        batch, seq, _ = x.shape
        if self.fused is not None:
            q, k, v = F.linear(x, *self.fused).split(
                (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim),
                dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(batch, seq, self.num_heads, self.head_dim), k.view(batch, seq, self.num_kv_heads, self.head_dim),
                v.view(batch, seq, self.num_kv_heads, self.head_dim))

    def forward(self, x, cos, sin, mask, layer_index: int, kv_cache: DecodeCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.projections(x)
        if isinstance(mask, (DocumentSpans, LengthGroups)):  # packed rows in a [tokens, heads, dim] layout
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
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:  # the cache rotates q and k, stores k, v and runs the attention
            out = kv_cache.attention(layer_index, q, k, v, mask, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = attend(q, k, v, mask, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused: torch.Tensor | None = None  # gate and up stacked; see CausalLM.fuse_projections

    def _apply(self, fn, recurse=True):
        self.fused = None
        return super()._apply(fn, recurse)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            return F.linear(x, self.fused).chunk(2, dim=-1)
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down_proj(F.silu(gate) * up)


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

    def forward_with_kernels(self, x, update, cos, sin, mask, layer_index, kv_cache):
        """forward of x + update (update None: of x), with the norms, residual adds and SiLU x up as Triton
        kernels: (the residual stream after attention, the MLP's output still to be added to it). The pending add
        goes into the next norm's kernel (see CausalLM.use_elementwise_kernels)."""
        from areal_async.model.elementwise_triton import rms_norm, silu_mul

        first, second = self.input_layernorm, self.post_attention_layernorm
        normed, x = rms_norm(x if update is None else update, first.weight, first.eps, residual=None if update is None
                             else x)
        attended = self.self_attn(normed, cos, sin, mask, layer_index, kv_cache)
        normed, x = rms_norm(attended, second.weight, second.eps, residual=x)
        return x, self.mlp.down_proj(silu_mul(*self.mlp.gate_and_up(normed)))


class DecoderBody(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def padded_positions_and_mask(input_ids: torch.Tensor, valid: torch.Tensor | None,
                              positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded rows without a cache: RoPE positions [B, T] (default: count of valid tokens before each one) and
    the attention mask [B, 1, T, T]."""
    if valid is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    if positions is None:
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return positions, attention_mask(valid, valid, 0)


class CausalLM(nn.Module):
    """Decoder-only LM. forward(input_ids) -> logits [batch, seq, vocab]."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.elementwise_kernels = False

    def use_elementwise_kernels(self, on: bool = True) -> None:
        """Runs the norms, residual adds and SiLU x up of no-grad forwards outside torch.compile as Triton kernels
        (areal_async/model/elementwise_triton.py; CUDA): the engine's eager decode steps and prefills, where each
        eager op is a kernel launch of its own. Each layer's last residual add goes into the next norm's kernel.
        Values are the eager ones up to the order of the norms' sums."""
        self.elementwise_kernels = on

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: DecodeCache | None = None,
        document_ids: torch.Tensor | None = None,
        document_lengths=None,
        packed_attention: PackedAttentionConfig | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden].

        input_ids: [B, T]; valid: [B, T] bool (False = padding; default all True); positions: [B, T] RoPE
        positions (default: count of valid tokens before each one). With kv_cache (a DecodeCache), the cache
        places the T tokens and picks their positions and mask itself.

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
            positions, mask = padded_positions_and_mask(input_ids, valid, positions)
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
        if self.elementwise_kernels and eager_inference():
            from areal_async.model.elementwise_triton import rms_norm

            update = None
            for index, layer in enumerate(self.model.layers):
                x, update = layer.forward_with_kernels(x, update, cos, sin, mask, index, kv_cache)
            if kv_cache is not None:
                kv_cache.advance(input_ids.shape[1])
            return rms_norm(update, self.model.norm.weight, self.model.norm.eps, residual=x)[0]
        for index, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, index, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        return self.model.norm(x)

    def forward(self, input_ids, valid=None, positions=None, kv_cache=None, document_ids=None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, valid, positions, kv_cache, document_ids))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Stores each layer's q/k/v weights (and biases) in one tensor and its gate/up weights in another; the
        parameters become views of them, so their names, values and in-place updates stay as they are, while a
        forward runs one matrix product for each set instead of three and two (the engine's decode steps). A
        later conversion (`.to`, `.half`) drops the fused tensors; calling this again restores them."""
        for layer in self.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if attention.fused is None:
                attention.fused = _stack_linears(attention.q_proj, attention.k_proj, attention.v_proj)
            if mlp.fused is None:
                mlp.fused = _stack_linears(mlp.gate_proj, mlp.up_proj)[0]


def _stack_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) tensor holding `linears`' rows in order; each Linear's parameters become views."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[offset:offset + rows], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[offset:offset + rows], requires_grad=linear.bias.requires_grad)
        offset += rows
    return weight, bias
