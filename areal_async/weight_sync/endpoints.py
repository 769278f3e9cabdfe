"""The two ends of weight publication: the learner's publisher and a rollout engine's receiver.

A receiver rebuilds each target bucket in a scratch buffer (received snapshot, or delta XOR its own bits),
checks it against the publisher's checksum of version v and only then copies it into its parameters, in
place. A failed bucket is left out, the receiver drops to version -1 and asks for a snapshot in the same round
(damage in transit must not leave it waiting for a round that never comes); after MAX_SNAPSHOT_REFETCHES
failed snapshots it gives up and raises `WeightSyncError` naming version and buckets. Layout and protocol
errors are fatal.

Publisher memory: two copies of the weights' bits (version v and, reused in place, the delta over v - 1);
receiver memory: one scratch bucket per dtype.

Stats: `WeightPublisher.stats()` / `WeightReceiver.stats()` return the last version's record
(`weight_sync_seconds`, bytes moved as delta and as snapshot, ...); `history` keeps every record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from areal_async.weight_sync.bits import bits_checksum
from areal_async.weight_sync.layout import (
    DEFAULT_BUCKET_BYTES, BucketLayout, describe_spec_mismatch, gather_bucket, param_specs, plan_buckets,
    scatter_bucket, xor_params_into,
)
from areal_async.weight_sync.protocol import (
    MAX_SNAPSHOT_REFETCHES, Ack, MessageKind, Release, WeightSyncError,
)
from areal_async.weight_sync.transports import WeightTransport


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
