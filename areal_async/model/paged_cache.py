"""A paged KV cache for continuous-batching generation with the shared decoder.

Keys and values live in one pool of fixed-size blocks, [layers, blocks, block_size, kv_heads, head_dim] each.
A sequence owns a block table (the ids of its blocks, in order): its token at position p sits at offset
p % block_size of block table[p // block_size]. Blocks are handed out and taken back by the engine's scheduler
(actors/scheduler.py); several sequences may point at the same full blocks (the G samples of one prompt). Block
0 is never handed out: the padding of prefill rows writes there (idle decode rows write nothing).

The engine binds the rows of the next forward (`bind_prefill` / `bind_decode`); the cache implements the protocol
`CausalLM.hidden_states` uses (`positions_and_mask`, `attention`, `advance`), so the model's own layers run
unchanged.

  prefill -- rows carry right-padded runs of tokens that start at position starts[row] (0 for a new prompt,
             later when an earlier part is already cached: a shared prompt, or a recompute after a weight swap).
             Their keys/values are written first; then attention is causal over the row's positions: over the new
             tokens alone when every row starts at 0 ("fresh"), else over the blocks gathered from the cache.
  decode  -- one token per row at position lengths[row] attends to positions 0 .. lengths[row] - 1 of its own
             blocks and to itself, and writes its key/value at lengths[row]; inactive rows read and write nothing.
             The Triton kernel (areal_async/model/paged_decode_triton.py; CUDA) reads only each sequence's own
             blocks, with static shapes (a CUDA graph per batch size, whatever the lengths); the reference
             ("gather": the blocks gathered, then one softmax) runs anywhere and is what the kernel is tested
             against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from areal_async.model.decoder import DecoderConfig, apply_rope

PREFILL, DECODE = "prefill", "decode"  # the "masks" of the two modes: the cache knows each row's positions
DECODE_KERNELS = ("triton", "gather")
MAX_DECODE_SPLITS = 16  # runs of split_tokens per (row, kv head) at most: longer sequences get longer runs
DECODE_PROGRAMS = 256  # programs a small batch's step spreads its rows over (about 2 per H100 SM; NOTES.md)
NULL_BLOCK = 0


def kv_block_bytes(config: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: keys and values of `block_size` positions in every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


def decode_split(batch: int, kv_heads: int, width: int, block_size: int, split_tokens: int) -> tuple[int, int]:
    """The decode kernel's split of a step of `batch` rows with block tables `width` wide: (split_blocks, spread).
    Each row's blocks spread evenly over `spread` programs, DECODE_PROGRAMS over the batch's rows and key/value
    heads (1 in a batch that fills them), at most split_blocks blocks each: split_tokens positions, or more where
    the widest row would make more than MAX_DECODE_SPLITS runs."""
    split_blocks = max(1, split_tokens // block_size, blocks_for(width, MAX_DECODE_SPLITS))
    return split_blocks, max(1, DECODE_PROGRAMS // (batch * kv_heads))


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


def rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope for one token per row: x [B, heads, D], cos, sin [B, D] -> [B, heads, D]."""
    return apply_rope(x[:, :, None], cos[:, None, None], sin[:, None, None])[:, :, 0]


def paged_decode_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """What the Triton decode kernel computes (same arguments, same writes), by gathering every row's blocks:
    q [B, H, D] and k_new [B, Hkv, D] before RoPE, v_new [B, Hkv, D], cos, sin [B, D], key_cache, value_cache
    [blocks, block_size, Hkv, D], block_tables [B, width], lengths [B], active [B] bool -> [B, H, D]. The
    softmax runs in fp32 over the cached positions below lengths[row] (none for an inactive row) and the row's
    own new key."""
    q, k_new = rotate_rows(q, cos, sin), rotate_rows(k_new, cos, sin)
    batch, heads, head_dim = q.shape
    kv_heads = k_new.shape[1]
    block_size = key_cache.shape[1]
    length = torch.where(active, lengths, torch.zeros_like(lengths))
    count = max(1, blocks_for(int(length.max()), block_size))
    blocks = block_tables[:, :count].long()
    span = count * block_size

    def gathered(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, span, D]
        return cache[blocks].reshape(batch, span, kv_heads, head_dim).transpose(1, 2).float()

    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
    scores = grouped @ gathered(key_cache).transpose(-1, -2) * scale  # [B, Hkv, G, span]
    cached = torch.arange(span, device=q.device)[None, :] < length[:, None]
    scores = scores.masked_fill(~cached[:, None, None, :], float("-inf"))
    own = (grouped * k_new.float()[:, :, None, :]).sum(-1, keepdim=True) * scale
    probs = torch.softmax(torch.cat([scores, own], -1), -1)
    out = probs[..., :span] @ gathered(value_cache) + probs[..., span:] * v_new.float()[:, :, None, :]
    rows = active.nonzero().squeeze(1)
    position = lengths[rows]
    block = block_tables[rows, position // block_size].long()
    key_cache[block, position % block_size] = k_new[rows]
    value_cache[block, position % block_size] = v_new[rows]
    return out.to(q.dtype).reshape(batch, heads, head_dim)


class PagedKVCache:
    """keys, values: [layers, blocks, block_size, kv_heads, head_dim] (block 0 is the null block).
    rope_kernel: a prefill rotates q and k with the Triton kernel of elementwise_triton (CUDA)."""

    def __init__(self, config: DecoderConfig, num_blocks: int, block_size: int, dtype, device,
                 decode_kernel: str = "gather", split_tokens: int = 1024, rope_kernel: bool = False) -> None:
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {decode_kernel!r}")
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged cache needs 2 blocks or more (one is the null block) and block_size >= 1, "
                             f"got {num_blocks} blocks of {block_size}")
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # zeros, not empty: masked positions are still multiplied by zero probabilities, and NaN bits would poison
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.decode_kernel, self.split_tokens = decode_kernel, split_tokens
        self.scale = config.head_dim**-0.5
        self._mode: str | None = None
        self._tables: torch.Tensor | None = None
        self._starts: torch.Tensor | None = None  # prefill: first position of each row; decode: its length
        self._counts: torch.Tensor | None = None  # prefill: real tokens of each row
        self._active: torch.Tensor | None = None
        self._fresh = True
        self._key_len = 0
        self._write_slots = self._gather_table = self._visible = None  # a prefill forward's layout
        self._split = (1, 1)  # (split_blocks, spread) of the bound decode batch
        self._kernel = None
        self._rope = apply_rope
        if rope_kernel:  # a prefill's RoPE as one Triton kernel for q and one for k
            from areal_async.model.elementwise_triton import rope

            self._rope = rope
        if decode_kernel == "triton":
            from areal_async.model.paged_decode_triton import paged_decode_attention

            self._kernel = paged_decode_attention

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def bind_prefill(self, block_tables: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor | None = None,
                     key_len: int = 0) -> None:
        """The next forward's rows: block_tables [B, width] int32, and counts[row] real tokens (right-padded) at
        positions starts[row] onwards (long tensors on the cache's device). starts None: every row starts at 0
        (new prompts), and attention runs over the new tokens alone; else it reads the first `key_len`
        positions of each row's blocks (the largest start + count, which the host knows)."""
        self._mode, self._tables, self._counts, self._starts = "prefill", block_tables, counts, starts
        self._fresh, self._key_len = starts is None, key_len

    def bind_decode(self, block_tables: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor) -> None:
        """The next forward's rows: one token each at position lengths[row] (views of the engine's buffers:
        block_tables [B, width] int32, lengths [B] long, active [B] bool)."""
        self._mode, self._tables, self._starts, self._active = "decode", block_tables, lengths, active
        batch, width = block_tables.shape
        self._split = decode_split(batch, self.keys.shape[3], width, self.block_size, self.split_tokens)

    def copy_blocks(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copies blocks `sources` onto blocks `targets` in every layer (long tensors on the cache's device)."""
        self.keys[:, targets] = self.keys[:, sources]
        self.values[:, targets] = self.values[:, sources]

    # --- the protocol CausalLM.hidden_states uses -------------------------------------------------------

    def positions_and_mask(self, input_ids: torch.Tensor, valid, positions):
        batch, seq = input_ids.shape
        if self._mode == "prefill":
            if positions is None:
                positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
                if self._starts is not None:
                    positions = positions + self._starts[:, None]
            self._prefill_layout(positions)
            return positions, PREFILL
        if self._mode != "decode" or seq != 1:
            raise ValueError("PagedKVCache: bind_prefill or bind_decode (one token per row) before a forward")
        return (self._starts[:, None] if positions is None else positions), DECODE

    def attention(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], k, v [B, Hkv, T, D] (before RoPE; cos, sin [B, 1, T, D]) -> attention output
        [B, H, T, D]."""
        if self._mode == "decode":
            return self._decode(layer_index, q, k, v, cos, sin)
        return self._prefill(layer_index, q, k, v, cos, sin)

    @torch.compiler.disable
    def _decode(self, layer_index: int, q, k, v, cos, sin) -> torch.Tensor:
        """Eager inside torch.compile (a graph break per layer): the kernel writes the cache in place. q, k, v
        stay views of the projections' output (the kernel reads them with their row strides)."""
        batch, heads, _, head_dim = q.shape
        args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], cos[:, 0, 0], sin[:, 0, 0], self.keys[layer_index],
                self.values[layer_index], self._tables, self._starts, self._active, self.scale)
        if self._kernel is not None:
            out = self._kernel(*args, *self._split)
        else:
            out = paged_decode_reference(*args)
        return out.reshape(batch, heads, 1, head_dim)

    @torch.compiler.disable  # it sets the layout on the cache: eager inside a compiled prefill
    def _prefill_layout(self, positions: torch.Tensor) -> None:
        """What every layer of a prefill forward shares, computed once for it: the cache slot each token writes
        (padding: the null block), and without `fresh` the blocks to gather and which of their positions each
        token sees. positions: [B, T]."""
        batch, seq = positions.shape
        real = torch.arange(seq, device=positions.device)[None, :] < self._counts[:, None]
        columns = (positions // self.block_size).clamp(max=self._tables.shape[1] - 1)
        blocks = torch.where(real, self._tables.gather(1, columns).long(), NULL_BLOCK)
        self._write_slots = (blocks * self.block_size + positions % self.block_size).reshape(-1)
        if not self._fresh:
            count = blocks_for(self._key_len, self.block_size)
            self._gather_table = self._tables[:, :count].long()
            span = torch.arange(count * self.block_size, device=positions.device)
            self._visible = (span[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, span]

    @torch.compiler.disable
    def _prefill(self, layer_index: int, q, k, v, cos, sin) -> torch.Tensor:
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        batch, heads, seq, head_dim = q.shape
        kv_heads = k.shape[1]
        for cache, new in ((self.keys, k), (self.values, v)):
            cache[layer_index].view(-1, kv_heads, head_dim)[self._write_slots] = new.transpose(1, 2).reshape(
                -1, kv_heads, head_dim)
        if self._fresh:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        span = self._visible.shape[-1]

        def gathered(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, span, D]
            return cache[layer_index][self._gather_table].reshape(batch, span, kv_heads, head_dim).transpose(1, 2)

        return F.scaled_dot_product_attention(q, gathered(self.keys), gathered(self.values),
                                              attn_mask=self._visible, enable_gqa=heads != kv_heads)

    def advance(self, tokens: int) -> None:
        """Nothing to do: keys/values are written by `attention`."""
