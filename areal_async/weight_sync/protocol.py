"""What travels between the publisher and a receiver: a release's messages, their headers, acknowledgements.

A publisher stages each version as a `Release`; a receiver that reports the version it holds gets the
`Message` that takes it to the release's version: nothing (it holds it), a delta (it holds v - 1) or a full
snapshot. A header (msgpack) names the version, the kind, the layout's fingerprint, the checksum of every
bucket of v and the buckets that follow (with the parameter list in snapshots). The receiver ends its part of
a round with an `Ack`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

import msgpack
import torch

if TYPE_CHECKING:
    from areal_async.weight_sync.layout import BucketLayout


class WeightSyncError(RuntimeError):
    """A weight update that cannot reproduce the publisher's bits, or a broken protocol."""


class BrokenRound(RuntimeError):
    """A control value no peer in a working round sends (a version, header length, header or acknowledgement
    out of range): the round broke, as when a member dies, and the run opens the next weight-sync epoch."""


class MessageKind(str, Enum):
    """What a receiver gets: a delta over v - 1, a full snapshot, or nothing (it already holds v)."""

    DELTA = "delta"
    SNAPSHOT = "snapshot"
    CURRENT = "current"


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


BucketBuffer = Callable[[int], torch.Tensor]  # bucket index -> receiver-owned words [bucket.numel]


class Ack(IntEnum):
    """What a receiver says of the message it fetched, before the round ends."""

    APPLIED = 0
    SNAPSHOT = 1  # a bucket failed its checksum: send a snapshot, in this round
    GIVE_UP = 2  # still failing after MAX_SNAPSHOT_REFETCHES snapshots: the receiver raises


MAX_SNAPSHOT_REFETCHES = 2
