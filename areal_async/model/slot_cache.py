"""A slot-addressed static KV cache for continuous-batching generation with the shared decoder.

Each slot holds one sequence: its tokens sit at cache positions 0 .. length-1 of the slot's row, so a
sequence's RoPE position is its cache position and no padding is ever stored in front of it. The engine
owns the per-slot lengths; the cache is told, before each forward, which slots the batch rows are
(`bind_prefill` / `bind_decode`). It implements the cache protocol `CausalLM.hidden_states` uses
(`positions_and_mask`, `attention`, `advance`), so the model's own layers run unchanged.

Two modes:
  prefill -- rows are arbitrary slots (a long tensor), their tokens right-padded, starting at position 0:
             the rows' keys/values are written at positions 0 .. T-1 and attention is causal over the
             tokens of this call only (padding sits after every real token, so no real token sees it).
  decode  -- rows are slots 0 .. B-1 and carry one token each, at position `lengths[row]`: it is
             written there and attends to positions 0 .. lengths[row] of its slot, read from the first
             `kv_len` positions (a bucket >= every bound row's length + 1). Everything is a tensor
             operation on preallocated storage with static shapes (no host sync), so a decode step can
             be captured in a CUDA graph; slots past their length are masked with an additive bias.

Grouped-query attention in decode runs each key/value head's group of query heads as that head's query
rows (q [B, H, 1, D] viewed as [B, Hkv, H/Hkv, D]), so the kernels read the cache once, with no repeated keys
and no dependence on the backend's GQA support.

Decode attention (`decode_attention`):
  matmul   -- two batched matmuls over the cache, [B*Hkv, G, D] @ [B*Hkv, D, L] and [B*Hkv, G, L] @
             [B*Hkv, L, D] (the cache's own storage, viewed: no copy), with the length mask and an fp32
             softmax between them. The row's new token is not read from the cache: its score and value are
             taken from k, v directly (one more softmax term), so the layers never write the cache; the new
             keys/values of every layer are written by one scatter each in `advance` (after the last layer).
             Plain tensor code with no in-place mutation: under torch.compile the whole decode forward is one
             graph (the mask, softmax and the self term fuse), with one graph break, at `advance`. Scores are
             fp32 (bmm with out_dtype) where the device supports it, else rounded to the model dtype first.
  sdpa     -- (default) the earlier path: each layer writes its token into the cache, then SDPA (the cuDNN / flash
             kernels) reads it with an additive bias; eager inside torch.compile (a graph break per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from areal_async.model.decoder import DecoderConfig

CAUSAL = "causal"  # the prefill-mode "mask": attention is causal within the call's own tokens
DECODE_ATTENTION = ("matmul", "sdpa")


def _fp32_bmm_supported(dtype: torch.dtype, device) -> bool:
    """Whether torch.bmm(..., out_dtype=torch.float32) runs for `dtype` inputs on `device` (and traces)."""
    if dtype == torch.float32:
        return False  # plain bmm is already fp32
    try:
        for where in ("meta", device):
            a = torch.zeros(2, 3, 8, dtype=dtype, device=where)
            torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32)
        return True
    except Exception:  # noqa: BLE001 - older torch or a backend without the kernel
        return False


def _bmm(a: torch.Tensor, b: torch.Tensor, fp32: bool) -> torch.Tensor:
    """a @ b (batched), fp32 out (accumulated in fp32 and not rounded to a's dtype where `fp32`)."""
    return torch.bmm(a, b, out_dtype=torch.float32) if fp32 else torch.bmm(a, b).float()


def slot_cache_bytes(config: DecoderConfig, slots: int, max_len: int, dtype: torch.dtype) -> int:
    """The bytes a SlotKVCache of `slots` slots and `max_len` positions allocates (keys and values, spares
    included)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * (slots + 1) * config.num_key_value_heads * (max_len + 1) * config.head_dim * element


class SlotKVCache:
    """keys, values: [layers, slots + 1, kv_heads, max_len + 1, head_dim] (the last slot and position are
    spares, never used)."""

    def __init__(self, config: DecoderConfig, slots: int, max_len: int, dtype, device,
                 decode_attention: str = "sdpa") -> None:
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        # one spare slot and position: a decode step's view of the first B slots and L positions never spans
        # a whole dimension, so torch.compile sees one kind of view for every bucket (no recompilation)
        shape = (config.num_hidden_layers, slots + 1, config.num_key_value_heads, max_len + 1, config.head_dim)
        # zeros, not empty: a slot that is bound but idle reads positions nobody wrote (masked, but NaN bits
        # would still poison its own row)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len
        self.dtype = dtype
        self.key_positions = torch.arange(max_len + 1, device=device)
        self._mode: str | None = None
        self._rows: torch.Tensor | None = None  # prefill: slot of each row
        self._starts: torch.Tensor | None = None  # decode: [B] position of each row's token
        self._kv_len = 0
        self._kv_positions = self.key_positions[:0]  # decode: positions 0 .. kv_len-1 (its size is kv_len)
        self.decode_attention = decode_attention
        self.fp32_scores = decode_attention == "matmul" and _fp32_bmm_supported(dtype, device)
        self._pending: list = []  # matmul decode: (layer, k, v) of each layer, written in `advance`

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def bind_prefill(self, rows: torch.Tensor) -> None:
        """The next forward's rows are slots `rows` [B] (long, on the cache's device), right-padded from
        position 0."""
        self._mode, self._rows = "prefill", rows

    def bind_decode(self, lengths: torch.Tensor, kv_len: int) -> None:
        """The next forward's rows are slots 0 .. B-1 (B = lengths.shape[0], a view of the engine's length
        buffer), one token each at position lengths[row]; attention reads the first `kv_len` positions."""
        if kv_len > self.max_len:
            raise ValueError(f"kv_len {kv_len} exceeds the cache's {self.max_len} positions")
        self._mode, self._starts, self._kv_len = "decode", lengths, kv_len
        # a tensor, not only an int: under torch.compile(dynamic=True) its size is a symbol, so one graph
        # serves every KV bucket
        self._kv_positions = self.key_positions[:kv_len]
        self._pending = []

    # --- the protocol CausalLM.hidden_states uses -------------------------------------------------------

    def positions_and_mask(self, input_ids: torch.Tensor, valid, positions):
        batch, seq = input_ids.shape
        if self._mode == "prefill":
            if positions is None:
                positions = self.key_positions[:seq].expand(batch, seq)
            return positions, CAUSAL
        if self._mode != "decode" or seq != 1:
            raise ValueError("SlotKVCache: bind_prefill or bind_decode (one token per row) before a forward")
        starts = self._starts
        if positions is None:
            positions = starts[:, None]
        if self.decode_attention == "matmul":  # the cached positions before the row's token: [B, kv_len]
            return positions, self._kv_positions[None, :] < starts[:, None]
        visible = self.key_positions[: self._kv_len][None, :] <= starts[:, None]  # [B, kv_len]
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        bias.masked_fill_(~visible, float("-inf"))
        return positions, bias[:, None, None, :]

    def attention(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """q [B, H, T, D], k, v [B, Hkv, T, D] (RoPE applied) -> attention output [B, H, T, D]."""
        if self._mode == "decode" and self.decode_attention == "matmul":
            return self._decode_matmul(layer_index, q, k, v, mask)
        return self._attention_in_place(layer_index, q, k, v, mask)

    def _decode_matmul(self, layer_index: int, q, k, v, earlier: torch.Tensor) -> torch.Tensor:
        """Decode attention without touching the cache: softmax over the cached positions `earlier` [B, L]
        (bool) of each row and the row's own new key; the new k, v are queued for `advance`."""
        batch, heads, _, head_dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        length = self._kv_positions.shape[0]
        scale = head_dim**-0.5
        # [B*Hkv, L, D] views of the cache's storage (slots are consecutive, so the slot and head dims merge)
        keys = self.keys[layer_index, :batch, :, :length].reshape(batch * kv_heads, length, head_dim)
        values = self.values[layer_index, :batch, :, :length].reshape(batch * kv_heads, length, head_dim)
        grouped = q.reshape(batch * kv_heads, group, head_dim)  # a view: q has one token per row
        scores = _bmm(grouped, keys.transpose(1, 2), self.fp32_scores).view(batch, kv_heads, group, length)
        scores = (scores * scale).masked_fill(~earlier[:, None, None, :], float("-inf"))
        own = (q.reshape(batch, kv_heads, group, head_dim).float() * k.float()).sum(-1, keepdim=True) * scale
        top = torch.maximum(scores.amax(-1, keepdim=True), own)  # finite: the own score always counts
        weights = torch.exp(scores - top)
        own_weight = torch.exp(own - top)
        total = weights.sum(-1, keepdim=True) + own_weight
        probs = (weights / total).to(v.dtype).view(batch * kv_heads, group, length)
        out = _bmm(probs, values, self.fp32_scores).view(batch, kv_heads, group, head_dim)
        out = out + (own_weight / total) * v.float()  # v [B, Hkv, 1, D]: the group's rows share it
        self._pending.append((layer_index, k, v))
        return out.to(q.dtype).reshape(batch, heads, 1, head_dim)

    @torch.compiler.disable
    def _attention_in_place(self, layer_index: int, q, k, v, mask) -> torch.Tensor:
        """Prefill, and decode with `sdpa`: writes k, v into the cache, then SDPA over it.

        Never compiled: under torch.compile the layers around it are compiled and this runs eagerly (a graph
        break), so the cache's in-place writes stay plain in-place writes into its storage."""
        batch, heads, seq, head_dim = q.shape
        kv_heads = k.shape[1]
        if self._mode == "prefill":
            self.keys[layer_index, :, :, :seq].index_put_((self._rows,), k)
            self.values[layer_index, :, :, :seq].index_put_((self._rows,), v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        keys, values = self.keys[layer_index, :batch], self.values[layer_index, :batch]
        index = self._starts.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # a view: q has one token per row
        out = F.scaled_dot_product_attention(
            grouped, keys[:, :, : self._kv_len], values[:, :, : self._kv_len], attn_mask=mask
        )
        return out.reshape(batch, heads, 1, head_dim)

    @torch.compiler.disable
    def advance(self, tokens: int) -> None:
        """Writes the decode step's queued keys/values (matmul decode) at each row's position: one scatter
        for all layers when every layer queued one. Lengths are the engine's to move (only sequences still
        running advance). Never compiled (in-place writes into the cache's storage; one graph break)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        batch, kv_heads, _, head_dim = pending[0][1].shape
        index = self._starts.view(1, batch, 1, 1, 1).expand(len(pending), batch, kv_heads, 1, head_dim)
        layers = [layer for layer, _, _ in pending]
        if layers == list(range(self.keys.shape[0])):
            self.keys[:, :batch].scatter_(3, index, torch.stack([k for _, k, _ in pending]))
            self.values[:, :batch].scatter_(3, index, torch.stack([v for _, _, v in pending]))
            return
        for layer, k, v in pending:
            self.keys[layer, :batch].scatter_(2, index[0], k)
            self.values[layer, :batch].scatter_(2, index[0], v)

    # --- slot moves (compaction) -------------------------------------------------------------------------

    def move(self, source: int, target: int, length: int) -> None:
        """Copies the first `length` positions of slot `source` into slot `target` (all layers)."""
        if length > 0:
            self.keys[:, target, :, :length].copy_(self.keys[:, source, :, :length])
            self.values[:, target, :, :length].copy_(self.values[:, source, :, :length])
