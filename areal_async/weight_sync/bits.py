"""Weights as bit patterns, and the checksum that proves two copies hold the same bits.

A bucket holds the raw bit patterns of its tensors as same-width integers (bf16/fp16 -> int16, fp32 -> int32,
fp64 -> int64). The delta of v over v - 1 is `bits(v) ^ bits(v - 1)`, applied as `bits(v - 1) ^ delta`: exact
for every pattern (NaN payloads, inf, -0.0), unlike float subtraction.

`bits_checksum` is a weighted sum, modulo 2**64, of a bucket's words (sign-extended to int64) with odd
pseudo-random position weights (splitmix64 of the column within 2**16-word rows times splitmix64 of the row).
Because every weight is odd, a change of any single word, in particular any single flipped bit, always changes
the sum; a change of several words goes unnoticed only if the weighted error sums to 0 mod 2**64 (about 2**-64
for unstructured errors), and swapped words are caught because their weights differ. It runs on the bucket's
device in int64 chunks (no host copy, bounded temporaries).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import msgpack
import torch

from areal_async.weight_sync.protocol import WeightSyncError

BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # by element size
_CHECKSUM_ROW = 1 << 16  # words per row of the position-weight table
_CHECKSUM_SPAN = 1 << 22  # words converted to int64 at a time (32 MiB temporaries)
_UINT64 = 1 << 64


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """Same-shape integer view (int8/16/32/64 by element size) of `tensor`'s storage; shares memory."""
    bits_dtype = BITS_DTYPES.get(tensor.element_size())
    if bits_dtype is None:
        raise WeightSyncError(f"no integer dtype of {tensor.element_size()} bytes for {tensor.dtype}")
    return tensor.detach().view(bits_dtype)


def _int64(value: int) -> int:
    """The two's-complement int64 value of an unsigned 64-bit constant."""
    value %= _UINT64
    return value - _UINT64 if value >= 1 << 63 else value


def _shift_right_logical(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """int64 [n] -> int64 [n]: the splitmix64 output for seed x (wrapping int64 arithmetic)."""
    z = x + _int64(0x9E3779B97F4A7C15)
    z = (z ^ _shift_right_logical(z, 30)) * _int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right_logical(z, 27)) * _int64(0x94D049BB133111EB)
    return z ^ _shift_right_logical(z, 31)


_weight_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def _weights(kind: str, count: int, device: torch.device) -> torch.Tensor:
    """int64 [>= count] odd pseudo-random weights, cached per device and grown by doubling.

    Row seeds start after the column seeds, so row and column weights are different draws.
    """
    cached = _weight_cache.get((kind, device))
    if cached is None or cached.numel() < count:
        size = max(count, 2 * cached.numel() if cached is not None else 1)
        first_seed = _CHECKSUM_ROW if kind == "row" else 0
        seeds = torch.arange(first_seed, first_seed + size, dtype=torch.int64, device=device)
        cached = _weight_cache[(kind, device)] = splitmix64(seeds) | 1
    return cached


def bits_checksum(words: torch.Tensor) -> torch.Tensor:
    """Integer tensor (any shape, read in flattened order) -> 0-d int64 checksum on the same device.

    sum_i words[i] * col(i % R) * row(i // R) mod 2**64 with R = 2**16 and odd pseudo-random col/row,
    computed in spans of _CHECKSUM_SPAN words (a multiple of R); the result does not depend on the span.
    """
    flat = words.reshape(-1)
    device = flat.device
    columns = _weights("column", _CHECKSUM_ROW, device)[:_CHECKSUM_ROW]
    rows = _weights("row", -(-flat.numel() // _CHECKSUM_ROW), device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, flat.numel(), _CHECKSUM_SPAN):
        span = flat[start:start + _CHECKSUM_SPAN].to(torch.int64)
        first_row = start // _CHECKSUM_ROW
        full_rows = span.numel() // _CHECKSUM_ROW
        if full_rows:
            row_sums = (span[:full_rows * _CHECKSUM_ROW].view(full_rows, _CHECKSUM_ROW) * columns).sum(dim=1)
            total += (row_sums * rows[first_row:first_row + full_rows]).sum()
        tail = span[full_rows * _CHECKSUM_ROW:]
        if tail.numel():  # a partial last row
            total += (tail * columns[:tail.numel()]).sum() * rows[first_row + full_rows]
    return total


def state_checksum(state: Mapping[str, torch.Tensor]) -> int:
    """63-bit checksum of a whole state (names, dtypes, shapes and bits of every tensor, in order).

    Independent of the bucket layout; one device-to-host copy for all tensors (all on one device).
    """
    if not state:
        tensor_sums: list[int] = []
    else:
        tensor_sums = torch.stack([bits_checksum(bits_of(t)) for t in state.values()]).tolist()
    record = [[name, dtype_name(t.dtype), list(t.shape), s] for (name, t), s in zip(state.items(), tensor_sums)]
    digest = hashlib.blake2b(msgpack.packb(record), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
