"""Transports move a release's messages from the publisher to receivers; they share one interface.

The publisher end `offer(release, receivers)` delivers a `Release` (the staged version) to receivers; the
receiver end `fetch(held_version, bucket_buffer)` sends the version it holds and returns the header plus an
iterator that fills `bucket_buffer(index)` for each bucket sent, and the receiver ends its part of the round
with `acknowledge(ack, bucket_buffer)`: APPLIED, GIVE_UP, or SNAPSHOT, which returns a snapshot's header and
iterator as fetch does. Deciding delta vs snapshot, headers, checksums and verification are shared code
(`Release`, `WeightReceiver`); transports only move bytes.

- `InProcessTransport`: offer keeps the newest release; fetch copies from it (the inline placement, tests).
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
  snapshot while the others get deltas (point-to-point that round). Control messages (steps 1, 2's header
  and 4) travel over a `control` group when one is given (gloo, on the CPU: the run's NCCL weight-sync groups
  get one, areal_async/actor_system/process_groups.py), else over the group itself on its device. Under NCCL a wait does
  not raise and an aborted group may leave garbage in a control tensor; over gloo a broken round raises, and
  every control value is checked (a version out of range, a header length above MAX_HEADER_BYTES, an
  unreadable header, an unknown acknowledgement raise BrokenRound, never a wrong decision).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from areal_async.weight_sync.protocol import (
    Ack, BrokenRound, BucketBuffer, Message, MessageKind, Release, WeightSyncError, decode_header, encode_header,
)

PUBLISHER_RANK = 0
MAX_HEADER_BYTES = 64 << 20  # a header lists bucket checksums and, for snapshots, the parameters: far less


@runtime_checkable
class WeightTransport(Protocol):
    """Moves releases from the publisher to receivers; `offer` runs on the publisher, `fetch` on a receiver."""

    def offer(self, release: Release, receivers: Sequence[int] | None = None) -> dict[MessageKind, int]:
        """Delivers `release` to `receivers` (all when None); returns bytes sent per message kind."""

    def fetch(self, held_version: int, bucket_buffer: BucketBuffer) -> tuple[dict[str, Any], Iterator[int]]:
        """Asks for the newest version holding `held_version`; returns the header and an iterator that
        fills `bucket_buffer(index)` for each bucket in `header["buckets"]` and yields its index.
        The caller must exhaust the iterator (the protocol stays in lockstep), then `acknowledge`."""

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
    (built from a store, as the run's weight-sync groups are: areal_async/actor_system/process_groups.py); ranks are the
    group's own. `control`: a gloo group of the same members for the control messages (default: `group`).
    `device` carries the control messages sent over `group` and must suit the backend: CUDA for NCCL, CPU for
    gloo (the default follows the group's backend). Bucket tensors travel as uint8 views, which every backend
    moves.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                 control: dist.ProcessGroup | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = self.group.rank()
        self.size = self.group.size()
        if device is None:
            uses_nccl = "nccl" in self.group.name().lower()
            device = torch.device("cuda", torch.cuda.current_device()) if uses_nccl else torch.device("cpu")
        self.device = device
        self.control = control if control is not None else self.group
        self.control_device = torch.device("cpu") if control is not None else device

    def _send(self, tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None) -> None:
        (group or self.group).send([tensor], dst, 0).wait()

    def _recv(self, tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> None:
        (group or self.group).recv([tensor], src, 0).wait()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = PUBLISHER_RANK
        self.group.broadcast([tensor], options).wait()

    def _send_int(self, value: int, dst: int) -> None:
        self._send(torch.tensor([value], dtype=torch.int64, device=self.control_device), dst, self.control)

    def _recv_int(self, src: int, low: int, high: int, what: str) -> int:
        """A control integer from `src`, checked to lie in [low, high]."""
        value = torch.empty(1, dtype=torch.int64, device=self.control_device)
        self._recv(value, src, self.control)
        number = int(value.item())
        if not low <= number <= high:
            raise BrokenRound(f"rank {src} sent {what} {number}, outside [{low}, {high}]: the round broke")
        return number

    def _recv_ack(self, src: int) -> Ack:
        return Ack(self._recv_int(src, min(Ack), max(Ack), "an acknowledgement"))

    def _send_header(self, header: Mapping[str, Any], dst: int) -> None:
        payload = encode_header(header).to(self.control_device)
        self._send_int(payload.numel(), dst)
        self._send(payload, dst, self.control)

    def _recv_header(self) -> dict[str, Any]:
        length = self._recv_int(PUBLISHER_RANK, 1, MAX_HEADER_BYTES, "a header length")
        payload = torch.empty(length, dtype=torch.uint8, device=self.control_device)
        self._recv(payload, PUBLISHER_RANK, self.control)
        try:
            header = decode_header(payload)
        except Exception as error:  # msgpack's many error types on bytes it cannot read
            raise BrokenRound(f"the publisher's header did not decode ({type(error).__name__}): the round broke")
        if not isinstance(header, dict) or not isinstance(header.get("buckets"), list):
            raise BrokenRound("the publisher's header is not a header: the round broke")
        return header

    def _receivers(self, receivers: Sequence[int] | None) -> list[int]:
        ranks = sorted(set(range(1, self.size) if receivers is None else receivers))
        if self.rank != PUBLISHER_RANK or any(not 0 < r < self.size for r in ranks):
            raise WeightSyncError(f"rank {self.rank} cannot publish to ranks {ranks} of a group of {self.size}")
        return ranks

    def offer(self, release: Release, receivers: Sequence[int] | None = None) -> dict[MessageKind, int]:
        ranks = self._receivers(receivers)
        messages = {rank: release.message_for(self._recv_int(rank, -1, release.version, "a held version"))
                    for rank in ranks}
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
            while self._recv_ack(rank) is Ack.SNAPSHOT:
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
