"""How parameters are laid out in flat buckets, computed the same on both sides.

Parameters (an ordered mapping name -> tensor, one device) are grouped by dtype (dtypes in order of first
appearance, parameters in mapping order inside a dtype) and packed greedily into flat buckets of at most
`bucket_bytes`; a tensor that does not fit closes the open bucket, so a tensor larger than a bucket gets a
bucket of its own. The layout is a pure function of (names, shapes, dtypes, bucket_bytes), so both sides
compute it; only its fingerprint travels, plus the parameter list in snapshot headers, so that a mismatch is
reported with the first differing parameter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgpack
import torch

from areal_async.weight_sync.bits import BITS_DTYPES, bits_of, dtype_name

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and dtype of one parameter: all a layout depends on."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def wire(self) -> list:
        """[name, [dims], dtype name], the form sent in snapshot headers."""
        return [self.name, list(self.shape), dtype_name(self.dtype)]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def param_specs(params: Mapping[str, torch.Tensor]) -> tuple[ParamSpec, ...]:
    """The specs of `params`, in mapping order."""
    return tuple(ParamSpec(name, tuple(t.shape), t.dtype) for name, t in params.items())


@dataclass(frozen=True)
class Slot:
    """A parameter's place in its bucket: words [offset, offset + numel), reshaped to `shape`."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of `numel` words of one dtype, holding `slots` back to back."""

    dtype: torch.dtype
    numel: int
    slots: tuple[Slot, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def bits_dtype(self) -> torch.dtype:
        return BITS_DTYPES[self.dtype.itemsize]


@dataclass(frozen=True)
class BucketLayout:
    """Buckets of a parameter list; `fingerprint` identifies (specs, bucket_bytes)."""

    specs: tuple[ParamSpec, ...]
    bucket_bytes: int
    buckets: tuple[Bucket, ...]
    fingerprint: str

    def wire_specs(self) -> list[list]:
        return [spec.wire() for spec in self.specs]


def layout_fingerprint(specs: Sequence[ParamSpec], bucket_bytes: int) -> str:
    """16 hex digits of sha256 over bucket_bytes and every (name, shape, dtype)."""
    payload = msgpack.packb([bucket_bytes, [spec.wire() for spec in specs]])
    return hashlib.sha256(payload).hexdigest()[:16]


def plan_buckets(specs: Sequence[ParamSpec], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> BucketLayout:
    """Deterministic layout: dtypes in order of first appearance, greedy packing in spec order.

    A spec that would overflow the open bucket closes it, so a tensor larger than `bucket_bytes`
    sits alone in its bucket. Every element of every spec is in exactly one slot.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    by_dtype: dict[torch.dtype, list[ParamSpec]] = {}
    for spec in specs:
        by_dtype.setdefault(spec.dtype, []).append(spec)
    buckets: list[Bucket] = []
    for dtype, members in by_dtype.items():
        capacity = bucket_bytes // dtype.itemsize
        slots: list[Slot] = []
        filled = 0
        for spec in members:
            if slots and filled + spec.numel > capacity:
                buckets.append(Bucket(dtype, filled, tuple(slots)))
                slots, filled = [], 0
            slots.append(Slot(spec.name, spec.shape, filled, spec.numel))
            filled += spec.numel
        if slots:
            buckets.append(Bucket(dtype, filled, tuple(slots)))
    return BucketLayout(tuple(specs), bucket_bytes, tuple(buckets), layout_fingerprint(specs, bucket_bytes))


def describe_spec_mismatch(publisher_specs: Sequence[list], receiver_specs: Sequence[list]) -> str:
    """Names the first parameter where two wire spec lists ([name, dims, dtype]) differ."""
    for position, (theirs, mine) in enumerate(zip(publisher_specs, receiver_specs)):
        if list(theirs) != list(mine):
            return (f"first differing parameter #{position}: publisher has {theirs[0]!r} {tuple(theirs[1])} "
                    f"{theirs[2]}, receiver has {mine[0]!r} {tuple(mine[1])} {mine[2]}")
    if len(publisher_specs) != len(receiver_specs):
        longer = publisher_specs if len(publisher_specs) > len(receiver_specs) else receiver_specs
        side = "publisher" if longer is publisher_specs else "receiver"
        return (f"publisher has {len(publisher_specs)} parameters, receiver {len(receiver_specs)}; "
                f"first parameter only the {side} has: {longer[min(len(publisher_specs), len(receiver_specs))][0]!r}")
    return "the parameter lists agree; the fingerprints were computed differently (mismatched code versions?)"


def gather_bucket(bucket: Bucket, params: Mapping[str, torch.Tensor], words: torch.Tensor) -> None:
    """Copies the bits of the bucket's parameters into `words` [bucket.numel] (bits dtype)."""
    for slot in bucket.slots:
        words[slot.offset:slot.offset + slot.numel].copy_(bits_of(params[slot.name]).reshape(-1))


def xor_params_into(bucket: Bucket, params: Mapping[str, torch.Tensor], words: torch.Tensor) -> None:
    """words [bucket.numel] ^= bits of the bucket's parameters: turns a delta into the target bits."""
    for slot in bucket.slots:
        words[slot.offset:slot.offset + slot.numel].bitwise_xor_(bits_of(params[slot.name]).reshape(-1))


def scatter_bucket(bucket: Bucket, words: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    """Copies `words` [bucket.numel] into the bucket's parameters in place (their storage is kept)."""
    for slot in bucket.slots:
        bits_of(params[slot.name]).copy_(words[slot.offset:slot.offset + slot.numel].view(slot.shape))
