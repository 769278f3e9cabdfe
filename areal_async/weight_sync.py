"""Versioned, bucketed, checksummed weight publishing (DESIGN.md, "Weight publication"; invariant 3).

After every training step learner rank 0 publishes version v of the policy weights; every rollout actor
that asks gets either a delta over its version (when it holds v - 1) or a full snapshot (fresh actor,
late joiner, missed version), and afterwards holds exactly the learner's bits.

Layout. Parameters (an ordered mapping name -> tensor, one device) are grouped by dtype (dtypes in order
of first appearance, parameters in mapping order inside a dtype) and packed greedily into flat buckets of
at most `bucket_bytes`; a tensor that does not fit closes the open bucket, so a tensor larger than a
bucket gets a bucket of its own. The layout is a pure function of (names, shapes, dtypes, bucket_bytes),
so both sides compute it; only its fingerprint travels, plus the parameter list in snapshot headers, so
that a mismatch is reported with the first differing parameter.

Bits. A bucket holds the raw bit patterns of its tensors as same-width integers (bf16/fp16 -> int16,
fp32 -> int32, fp64 -> int64). The delta of v over v - 1 is `bits(v) ^ bits(v - 1)`, applied as
`bits(v - 1) ^ delta`: exact for every pattern (NaN payloads, inf, -0.0), unlike float subtraction.
Buckets whose delta is all zero are not sent.

Checksums. `bits_checksum` is a weighted sum, modulo 2**64, of a bucket's words (sign-extended to int64)
with odd pseudo-random position weights (splitmix64 of the column within 2**16-word rows times splitmix64
of the row). Because every weight is odd, a change of any single word, in particular any single flipped
bit, always changes the sum; a change of several words goes unnoticed only if the weighted error sums
to 0 mod 2**64 (about 2**-64 for unstructured errors), and swapped words are caught because their
weights differ. It runs on the bucket's device in int64 chunks (no host copy, bounded temporaries).
A receiver rebuilds each target bucket in a scratch buffer (received snapshot, or delta XOR its own
bits), checks it against the publisher's checksum of version v and only then copies it into its
parameters, in place. A failed bucket is left out, the receiver drops to version -1 and asks for a snapshot
in the same round (damage in transit must not leave it waiting for a round that never comes); after
MAX_SNAPSHOT_REFETCHES failed snapshots it gives up and raises `WeightSyncError` naming version and
buckets. Layout and protocol errors are fatal.

Publisher memory: two copies of the weights' bits (version v and, reused in place, the delta over v - 1);
receiver memory: one scratch bucket per dtype.

Transports share one interface: the publisher end `offer(release, receivers)` delivers a `Release`
(the staged version) to receivers, the receiver end `fetch(held_version, bucket_buffer)` sends the
version it holds and returns the header plus an iterator that fills `bucket_buffer(index)` for each bucket
sent, and the receiver ends its part of the round with `acknowledge(ack, bucket_buffer)`: APPLIED, GIVE_UP, or
SNAPSHOT, which returns a snapshot's header and iterator as fetch does. Deciding delta vs snapshot, headers, checksums and verification are shared code (`Release`,
`WeightReceiver`); transports only move bytes.

- `InProcessTransport`: offer keeps the newest release; fetch copies from it (synchronous loop, tests).
- `TorchDistributedTransport`: a torch.distributed group (gloo on CPU, NCCL on GPU) whose rank 0 is the
  publisher and ranks 1..n-1 are receivers. Every publish is a round for an explicit list of receiver
  ranks (default: all), chosen by the caller; receivers left out do nothing that round. In a round:
    1. each listed receiver sends its held version (int64[1]); rank 0 receives them in rank order;
    2. rank 0 sends each listed receiver its header: int64[1] byte length, then uint8 msgpack payload
       (version, kind, bucket_bytes, layout fingerprint, checksums of every bucket of v, indices of the
       buckets that follow, broadcast flag, parameter list for snapshots);
    3. bucket bytes (uint8 views) follow in header order: one `broadcast` per bucket when every receiver
       of the group takes part and all need the same message (the steady state: all deltas; the start:
       all snapshots), otherwise point-to-point `send`s, receiver after receiver;
    4. each listed receiver sends its acknowledgement (int64[1]), in rank order; after SNAPSHOT rank 0
       sends it a snapshot (header and buckets, point-to-point) and reads its next acknowledgement.
  A receiver that missed rounds simply takes part in a later one: it reports an old version and gets a
  snapshot while the others get deltas (point-to-point that round). Control messages travel as tensors on
  the group's device (CUDA for NCCL) over the same group, so no second group is needed.
- `CudaIpcTransport`: learner and actor on one GPU. Per receiver a pair of torch.multiprocessing queues:
  the receiver puts its held version, the publisher replies (header, bucket tensors) which the queue
  shares through CUDA IPC handles, the receiver copies each into its scratch, synchronises and puts
  "done"; the publisher waits for every "done" before it may overwrite its buffers at the next publish, then
  for each receiver's acknowledgement (a SNAPSHOT one is answered with a snapshot and another "done").

Stats: `WeightPublisher.stats()` / `WeightReceiver.stats()` return the last version's record
(`weight_sync_seconds`, bytes moved as delta and as snapshot, ...); `history` keeps every record.
"""

from __future__ import annotations

import hashlib
import queue
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

import msgpack
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp  # registers the CUDA tensor reductions the IPC queues rely on

DEFAULT_BUCKET_BYTES = 256 << 20
PUBLISHER_RANK = 0
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHECKSUM_ROW = 1 << 16  # words per row of the position-weight table
_CHECKSUM_SPAN = 1 << 22  # words converted to int64 at a time (32 MiB temporaries)
_UINT64 = 1 << 64


class WeightSyncError(RuntimeError):
    """A weight update that cannot reproduce the publisher's bits, or a broken protocol."""


class MessageKind(str, Enum):
    """What a receiver gets: a delta over v - 1, a full snapshot, or nothing (it already holds v)."""

    DELTA = "delta"
    SNAPSHOT = "snapshot"
    CURRENT = "current"


# --------------------------------------------------------------------------------------------- bits


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """Same-shape integer view (int8/16/32/64 by element size) of `tensor`'s storage; shares memory."""
    bits_dtype = _BITS_DTYPES.get(tensor.element_size())
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
    record = [[name, _dtype_name(t.dtype), list(t.shape), s] for (name, t), s in zip(state.items(), tensor_sums)]
    digest = hashlib.blake2b(msgpack.packb(record), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ------------------------------------------------------------------------------------------- layout


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        return [self.name, list(self.shape), _dtype_name(self.dtype)]


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
        return _BITS_DTYPES[self.dtype.itemsize]


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


# ------------------------------------------------------------------------------------------ release


@dataclass
class Message:
    """What one receiver gets: a header and (bucket index, words) pairs in header order."""

    header: dict[str, Any]
    buckets: list[tuple[int, torch.Tensor]]

    @property
    def kind(self) -> MessageKind:
        return MessageKind(self.header["kind"])

    @property
    def nbytes(self) -> int:
        return sum(words.numel() * words.element_size() for _, words in self.buckets)


@dataclass
class Release:
    """A staged version: its bucket bits, the delta over version - 1 (if that was the previous release),
    the indices of buckets with a non-zero delta, and the checksum of every bucket of this version.

    Valid until the publisher stages the next version (it reuses these buffers).
    """

    version: int
    layout: BucketLayout
    bits: list[torch.Tensor]
    delta: list[torch.Tensor] | None
    changed: list[int]
    checksums: list[int]

    def kind_for(self, held_version: int) -> MessageKind:
        """Nothing for a receiver at this version, a delta for one at version - 1, else a snapshot."""
        if held_version == self.version:
            return MessageKind.CURRENT
        if held_version == self.version - 1 >= 0 and self.delta is not None:
            return MessageKind.DELTA
        return MessageKind.SNAPSHOT

    def message_for(self, held_version: int) -> Message:
        """The header and buckets that take a receiver from `held_version` to this version."""
        kind = self.kind_for(held_version)
        if kind is MessageKind.DELTA:
            buckets = [(index, self.delta[index]) for index in self.changed]
        elif kind is MessageKind.SNAPSHOT:
            buckets = list(enumerate(self.bits))
        else:
            buckets = []
        header = {
            "version": self.version,
            "kind": kind.value,
            "bucket_bytes": self.layout.bucket_bytes,
            "fingerprint": self.layout.fingerprint,
            "checksums": self.checksums,
            "buckets": [index for index, _ in buckets],
        }
        if kind is MessageKind.SNAPSHOT:
            header["specs"] = self.layout.wire_specs()
        return Message(header, buckets)


def encode_header(header: Mapping[str, Any]) -> torch.Tensor:
    """Header dict -> uint8 [n] msgpack bytes (CPU)."""
    return torch.frombuffer(bytearray(msgpack.packb(dict(header))), dtype=torch.uint8)


def decode_header(payload: torch.Tensor) -> dict[str, Any]:
    """uint8 [n] msgpack bytes (any device) -> header dict."""
    return msgpack.unpackb(payload.cpu().numpy().tobytes())


# --------------------------------------------------------------------------------------- transports

BucketBuffer = Callable[[int], torch.Tensor]  # bucket index -> receiver-owned words [bucket.numel]


class Ack(IntEnum):
    """What a receiver says of the message it fetched, before the round ends."""

    APPLIED = 0
    SNAPSHOT = 1  # a bucket failed its checksum: send a snapshot, in this round
    GIVE_UP = 2  # still failing after MAX_SNAPSHOT_REFETCHES snapshots: the receiver raises


MAX_SNAPSHOT_REFETCHES = 2


class WeightTransport(ABC):
    """Moves releases from the publisher to receivers; `offer` runs on the publisher, `fetch` on a receiver."""

    @abstractmethod
    def offer(self, release: Release, receivers: Sequence[int] | None = None) -> dict[MessageKind, int]:
        """Delivers `release` to `receivers` (all when None); returns bytes sent per message kind."""

    @abstractmethod
    def fetch(self, held_version: int, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]]:
        """Asks for the newest version holding `held_version`; returns the header and an iterator that
        fills `bucket_buffer(index)` for each bucket in `header["buckets"]` and yields its index.
        The caller must exhaust the iterator (the protocol stays in lockstep), then `acknowledge`."""

    @abstractmethod
    def acknowledge(self, ack: Ack, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]] | None:
        """Ends the receiver's part of the round (APPLIED, GIVE_UP), or asks for a snapshot within it
        (SNAPSHOT): then returns the snapshot's header and bucket iterator, as `fetch` does."""


def _bytes_by_kind(messages: Sequence[Message]) -> dict[MessageKind, int]:
    sent = {kind: 0 for kind in MessageKind}
    for message in messages:
        sent[message.kind] += message.nbytes
    return sent


class InProcessTransport(WeightTransport):
    """Publisher and receivers in one process: `offer` keeps the release, `fetch` copies out of it.

    Bytes are copied at fetch time, so the publisher's `offer` reports none; receivers count them.
    """

    def __init__(self) -> None:
        self._release: Release | None = None

    def offer(self, release: Release, receivers: Sequence[int] | None = None) -> dict[MessageKind, int]:
        self._release = release
        return _bytes_by_kind([])

    def fetch(self, held_version: int, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]]:
        if self._release is None:
            raise WeightSyncError("nothing has been published yet")
        message = self._release.message_for(held_version)
        return message.header, self._copy(message, bucket_buffer)

    def acknowledge(self, ack: Ack, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]] | None:
        return self.fetch(-1, bucket_buffer) if ack is Ack.SNAPSHOT else None

    @staticmethod
    def _copy(message: Message, bucket_buffer: BucketBuffer) -> Iterator[int]:
        for index, words in message.buckets:
            bucket_buffer(index).copy_(words)
            yield index


def should_broadcast(kinds: Mapping[int, MessageKind], group_size: int) -> bool:
    """One broadcast serves a round iff every receiver of the group takes part and needs the same message."""
    return len(kinds) == group_size - 1 and len(set(kinds.values())) == 1


class TorchDistributedTransport(WeightTransport):
    """Rounds over a torch.distributed group: rank 0 publishes, ranks 1..n-1 receive (module docstring).

    `group` is a process group object, registered in the process's world (default: the world) or standalone
    (built from a store, as the run's weight-sync groups are: areal_async/process_groups.py); ranks are the
    group's own. `device` carries control messages and must suit the backend: CUDA for NCCL, CPU for gloo (the
    default follows the group's backend). Bucket tensors travel as uint8 views, which every backend moves.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = self.group.rank()
        self.size = self.group.size()
        if device is None:
            uses_nccl = "nccl" in self.group.name().lower()
            device = torch.device("cuda", torch.cuda.current_device()) if uses_nccl else torch.device("cpu")
        self.device = device

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        self.group.send([tensor], dst, 0).wait()

    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        self.group.recv([tensor], src, 0).wait()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = PUBLISHER_RANK
        self.group.broadcast([tensor], options).wait()

    def _send_int(self, value: int, dst: int) -> None:
        self._send(torch.tensor([value], dtype=torch.int64, device=self.device), dst)

    def _recv_int(self, src: int) -> int:
        value = torch.empty(1, dtype=torch.int64, device=self.device)
        self._recv(value, src)
        return int(value.item())

    def _send_header(self, header: Mapping[str, Any], dst: int) -> None:
        payload = encode_header(header).to(self.device)
        self._send_int(payload.numel(), dst)
        self._send(payload, dst)

    def _recv_header(self) -> dict[str, Any]:
        payload = torch.empty(self._recv_int(PUBLISHER_RANK), dtype=torch.uint8, device=self.device)
        self._recv(payload, PUBLISHER_RANK)
        return decode_header(payload)

    def _receivers(self, receivers: Sequence[int] | None) -> list[int]:
        ranks = sorted(set(range(1, self.size) if receivers is None else receivers))
        if self.rank != PUBLISHER_RANK or any(not 0 < r < self.size for r in ranks):
            raise WeightSyncError(f"rank {self.rank} cannot publish to ranks {ranks} of a group of {self.size}")
        return ranks

    def offer(self, release: Release, receivers: Sequence[int] | None = None) -> dict[MessageKind, int]:
        ranks = self._receivers(receivers)
        messages = {rank: release.message_for(self._recv_int(rank)) for rank in ranks}
        broadcast = should_broadcast({rank: m.kind for rank, m in messages.items()}, self.size)
        for rank, message in messages.items():
            self._send_header({**message.header, "broadcast": broadcast}, rank)
        if broadcast:
            shared = messages[ranks[0]]
            for _, words in shared.buckets:
                self._broadcast(words.view(torch.uint8))
            sent = _bytes_by_kind([shared])
        else:
            for rank, message in messages.items():
                self._send_buckets(message, rank)
            sent = _bytes_by_kind(list(messages.values()))
        for rank in ranks:  # a receiver whose buckets failed their checksums gets a snapshot in this round
            while Ack(self._recv_int(rank)) is Ack.SNAPSHOT:
                snapshot = release.message_for(-1)
                self._send_header({**snapshot.header, "broadcast": False}, rank)
                self._send_buckets(snapshot, rank)
                sent[MessageKind.SNAPSHOT] += snapshot.nbytes
        if self.device.type == "cuda":  # NCCL calls return once enqueued; the timing should cover the transfer
            torch.cuda.current_stream(self.device).synchronize()
        return sent

    def _send_buckets(self, message: Message, rank: int) -> None:
        for _, words in message.buckets:
            self._send(words.view(torch.uint8), rank)

    def fetch(self, held_version: int, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]]:
        if self.rank == PUBLISHER_RANK:
            raise WeightSyncError("the publisher rank cannot fetch")
        self._send_int(held_version, PUBLISHER_RANK)
        header = self._recv_header()
        return header, self._receive(header, bucket_buffer)

    def acknowledge(self, ack: Ack, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]] | None:
        self._send_int(int(ack), PUBLISHER_RANK)
        if ack is not Ack.SNAPSHOT:
            return None
        header = self._recv_header()
        return header, self._receive(header, bucket_buffer)

    def _receive(self, header: Mapping[str, Any], bucket_buffer: BucketBuffer) -> Iterator[int]:
        for index in header["buckets"]:
            wire = bucket_buffer(index).view(torch.uint8)
            if header["broadcast"]:
                self._broadcast(wire)
            else:
                self._recv(wire, PUBLISHER_RANK)
            yield index


@dataclass
class IpcChannel:
    """Side channel between the publisher and one receiver on the same GPU.

    `to_publisher` carries the receiver's held version, then "done"; `to_receiver` carries
    (header, [bucket tensors]), the tensors shared through CUDA IPC by torch.multiprocessing.
    """

    to_publisher: Any
    to_receiver: Any


_IPC_DONE = "done"


def make_ipc_channels(receiver_ids: Sequence[int], context: Any = None) -> dict[int, IpcChannel]:
    """One channel per receiver, from torch.multiprocessing queues of `context` (default: spawn)."""
    context = context or torch_mp.get_context("spawn")
    return {rid: IpcChannel(context.Queue(), context.Queue()) for rid in receiver_ids}


class CudaIpcTransport(WeightTransport):
    """Publisher and receivers share one GPU: buckets go by CUDA IPC handle, the receiver copies them.

    The publisher end holds every receiver's channel; a receiver end holds exactly its own.
    A receiver that does not answer within `timeout_s` is an error.
    """

    def __init__(self, channels: Mapping[int, IpcChannel], timeout_s: float = 600.0) -> None:
        self.channels = dict(channels)
        self.timeout_s = timeout_s

    def _get(self, channel_queue: Any, what: str) -> Any:
        try:
            return channel_queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise WeightSyncError(f"no {what} within {self.timeout_s} s") from None

    def offer(self, release: Release, receivers: Sequence[int] | None = None) -> dict[MessageKind, int]:
        ids = sorted(self.channels if receivers is None else receivers)
        messages = {rid: release.message_for(self._get(self.channels[rid].to_publisher, f"request of {rid}"))
                     for rid in ids}
        if release.bits:  # the buckets must be final before another process reads them
            torch.cuda.current_stream(release.bits[0].device).synchronize()
        for rid, message in messages.items():
            self.channels[rid].to_receiver.put((message.header, [words for _, words in message.buckets]))
        for rid in ids:  # our buffers are overwritten at the next publish: wait until every copy is done
            self._wait_done(rid)
        sent = _bytes_by_kind(list(messages.values()))
        for rid in ids:  # a receiver whose buckets failed their checksums gets a snapshot in this round
            while Ack(self._get(self.channels[rid].to_publisher, f"acknowledgement of {rid}")) is Ack.SNAPSHOT:
                snapshot = release.message_for(-1)
                self.channels[rid].to_receiver.put((snapshot.header, [words for _, words in snapshot.buckets]))
                self._wait_done(rid)
                sent[MessageKind.SNAPSHOT] += snapshot.nbytes
        return sent

    def _wait_done(self, rid: int) -> None:
        if self._get(self.channels[rid].to_publisher, f"'done' of {rid}") != _IPC_DONE:
            raise WeightSyncError(f"receiver {rid} broke the IPC protocol")

    def fetch(self, held_version: int, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]]:
        if len(self.channels) != 1:
            raise WeightSyncError("a receiver's CudaIpcTransport holds exactly its own channel")
        (channel,) = self.channels.values()
        channel.to_publisher.put(held_version)
        header, shared = self._get(channel.to_receiver, "reply from the publisher")
        return header, self._copy(channel, header, shared, bucket_buffer)

    def acknowledge(self, ack: Ack, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]] | None:
        (channel,) = self.channels.values()
        channel.to_publisher.put(int(ack))
        if ack is not Ack.SNAPSHOT:
            return None
        header, shared = self._get(channel.to_receiver, "snapshot from the publisher")
        return header, self._copy(channel, header, shared, bucket_buffer)

    @staticmethod
    def _copy(channel: IpcChannel, header: Mapping[str, Any], shared: list[torch.Tensor],
              bucket_buffer: BucketBuffer) -> Iterator[int]:
        for index, words in zip(header["buckets"], shared):
            bucket_buffer(index).copy_(words)
            yield index
        if shared:  # our copies must be complete before the publisher may overwrite its buffers
            torch.cuda.current_stream().synchronize()
        shared.clear()  # hold no references to the publisher's buffers past the round
        channel.to_publisher.put(_IPC_DONE)


# ------------------------------------------------------------------------------- publisher/receiver


def _device_of(params: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


def _allocate_buckets(layout: BucketLayout, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(bucket.numel, dtype=bucket.bits_dtype, device=device) for bucket in layout.buckets]


def _checksums(words: Sequence[torch.Tensor]) -> list[int]:
    """One host transfer for the checksums of all `words`."""
    return torch.stack([bits_checksum(w) for w in words]).tolist() if words else []


class WeightPublisher:
    """Learner rank 0's side: stages each version's bits, forms the delta, hands the release to a transport."""

    def __init__(self, params: Mapping[str, torch.Tensor], transport: WeightTransport,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.layout = plan_buckets(param_specs(params), bucket_bytes)
        self.device = _device_of(params)
        self.transport = transport
        self.history: list[dict[str, Any]] = []
        self._release: Release | None = None
        self._spare: list[torch.Tensor] | None = None  # the buffers of the release before the current one

    @property
    def version(self) -> int:
        """The last published version; -1 before the first publish."""
        return self._release.version if self._release is not None else -1

    def stage(self, params: Mapping[str, torch.Tensor], version: int) -> Release:
        """Copies `params` into bucket buffers, XORs the previous release's buffers into the delta in place,
        and checksums the buckets that changed. Invalidates the previous release."""
        if version <= self.version:
            raise WeightSyncError(f"version {version} does not follow the published version {self.version}")
        specs = param_specs(params)
        if specs != self.layout.specs:
            mismatch = describe_spec_mismatch(self.layout.wire_specs(), [spec.wire() for spec in specs])
            raise WeightSyncError(f"version {version}: parameters differ from the publisher's layout: {mismatch}")
        previous = self._release
        bits = self._spare if self._spare is not None else _allocate_buckets(self.layout, self.device)
        for bucket, words in zip(self.layout.buckets, bits):
            gather_bucket(bucket, params, words)
        if previous is not None and previous.version == version - 1:
            delta = previous.bits
            for old, new in zip(delta, bits):
                old.bitwise_xor_(new)
            nonzero = torch.stack([d.any() for d in delta]).tolist() if delta else []
            changed = [index for index, flag in enumerate(nonzero) if flag]
            checksums = list(previous.checksums)
            for index, value in zip(changed, _checksums([bits[i] for i in changed])):
                checksums[index] = value
        else:
            delta = None
            changed = list(range(len(bits)))
            checksums = _checksums(bits)
        self._spare = previous.bits if previous is not None else None
        self._release = Release(version, self.layout, bits, delta, changed, checksums)
        return self._release

    def publish(self, params: Mapping[str, torch.Tensor], version: int,
                receivers: Sequence[int] | None = None) -> dict[str, Any]:
        """Stages `params` as `version` and offers it to `receivers` (all when None); returns its stats."""
        started = time.perf_counter()
        self.stage(params, version)
        return self.offer(receivers, started)

    def offer(self, receivers: Sequence[int] | None = None, started: float | None = None) -> dict[str, Any]:
        """Offers the staged version (again: to a new group after a member died) to `receivers` (all when
        None); returns its stats."""
        if self._release is None:
            raise WeightSyncError("nothing has been staged yet")
        release = self._release
        staged = time.perf_counter()
        started = staged if started is None else started
        sent = self.transport.offer(release, receivers)
        finished = time.perf_counter()
        record = {
            "version": release.version,
            "weight_sync_seconds": finished - started,
            "stage_seconds": staged - started,
            "transfer_seconds": finished - staged,
            "changed_buckets": len(release.changed),
            "total_buckets": len(release.bits),
            "delta_bytes": sent[MessageKind.DELTA],
            "snapshot_bytes": sent[MessageKind.SNAPSHOT],
        }
        self.history.append(record)
        return record

    def stats(self) -> dict[str, Any]:
        """The last published version's record ({} before the first publish)."""
        return dict(self.history[-1]) if self.history else {}


class WeightReceiver:
    """A rollout actor's side: syncs `params` (its model's tensors) to the newest version, in place."""

    def __init__(self, params: Mapping[str, torch.Tensor], transport: WeightTransport) -> None:
        self.params = dict(params)
        self.specs = param_specs(params)
        self.device = _device_of(params)
        self.transport = transport
        self.version = -1
        self.history: list[dict[str, Any]] = []
        self._layout: BucketLayout | None = None
        self._held_checksums: list[int] | None = None
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def _layout_for(self, header: Mapping[str, Any]) -> BucketLayout:
        """Our layout under the publisher's bucket_bytes; a different fingerprint is a fatal error."""
        if self._layout is None or self._layout.bucket_bytes != header["bucket_bytes"]:
            self._layout = plan_buckets(self.specs, header["bucket_bytes"])
            self._scratch = {}
        if header["fingerprint"] != self._layout.fingerprint:
            detail = (describe_spec_mismatch(header["specs"], self._layout.wire_specs()) if "specs" in header
                      else f"fingerprint {header['fingerprint']} != {self._layout.fingerprint}")
            raise WeightSyncError(f"version {header['version']}: layout mismatch: {detail}")
        return self._layout

    def _bucket_buffer(self, index: int) -> torch.Tensor:
        """Scratch words [numel] for bucket `index`; one buffer per dtype, sized for its largest bucket."""
        bucket = self._layout.buckets[index]
        if bucket.dtype not in self._scratch:
            largest = max(b.numel for b in self._layout.buckets if b.dtype == bucket.dtype)
            self._scratch[bucket.dtype] = torch.empty(largest, dtype=bucket.bits_dtype, device=self.device)
        return self._scratch[bucket.dtype][:bucket.numel]

    def _check_kind(self, header: Mapping[str, Any], kind: MessageKind) -> None:
        """A delta must start from our version, and 'current' must be our version."""
        base = header["version"] - 1 if kind is MessageKind.DELTA else header["version"]
        if kind is not MessageKind.SNAPSHOT and self.version != base:
            raise WeightSyncError(f"version {header['version']}: got a {kind.value} message at version {self.version}")

    def sync(self) -> int:
        """Fetches and applies the newest version; returns it. A message whose buckets fail their checksums
        is followed by a snapshot in the same round (up to MAX_SNAPSHOT_REFETCHES); raises WeightSyncError
        when those fail too (the receiver then holds no version: its next sync fetches a snapshot)."""
        started = time.perf_counter()
        header, filled = self.transport.fetch(self.version, self._bucket_buffer)
        refetches = 0
        while (failure := self._apply(header, filled)) is not None:
            self.version, self._held_checksums = -1, None
            if refetches == MAX_SNAPSHOT_REFETCHES:
                self.transport.acknowledge(Ack.GIVE_UP, self._bucket_buffer)
                raise WeightSyncError(f"{failure}; {refetches} snapshots fetched in the same round failed too")
            header, filled = self.transport.acknowledge(Ack.SNAPSHOT, self._bucket_buffer)
            refetches += 1
        self.transport.acknowledge(Ack.APPLIED, self._bucket_buffer)
        self.history[-1].update(weight_sync_seconds=time.perf_counter() - started, refetched_snapshots=refetches)
        return self.version

    def _apply(self, header: Mapping[str, Any], filled: Iterator[int]) -> str | None:
        """Applies one message (exhausting `filled`); returns what failed its checksums, or None."""
        layout = self._layout_for(header)
        kind = MessageKind(header["kind"])
        self._check_kind(header, kind)
        expected = header["checksums"]
        failed: list[int] = []
        received_bytes = 0
        for index in filled:
            bucket = layout.buckets[index]
            words = self._bucket_buffer(index)
            received_bytes += bucket.nbytes
            if kind is MessageKind.DELTA:
                xor_params_into(bucket, self.params, words)
            if bits_checksum(words).item() != expected[index]:
                failed.append(index)
                continue
            scatter_bucket(bucket, words, self.params)
        if kind is MessageKind.DELTA:  # buckets left out must be ones whose bits we already hold
            sent = set(header["buckets"])
            failed += [i for i, (mine, theirs) in enumerate(zip(self._held_checksums, expected))
                       if i not in sent and mine != theirs]
        if failed:
            return f"version {header['version']} ({kind.value}): buckets {sorted(failed)} do not match the " \
                   "publisher's checksums"
        self.version, self._held_checksums = header["version"], list(expected)
        self.history.append({
            "version": self.version,
            "kind": kind.value,
            "delta_bytes": received_bytes if kind is MessageKind.DELTA else 0,
            "snapshot_bytes": received_bytes if kind is MessageKind.SNAPSHOT else 0,
            "buckets_applied": len(header["buckets"]),
        })
        return None

    def stats(self) -> dict[str, Any]:
        """The last applied version's record ({} before the first sync)."""
        return dict(self.history[-1]) if self.history else {}
