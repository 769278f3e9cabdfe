"""The weight-sync round's control messages: over a gloo control group of their own (the run gives its NCCL
groups one), and every control value checked, so garbage read after an abort breaks the round instead of
deciding it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from areal_async.weight_sync import BrokenRound, TorchDistributedTransport, WeightPublisher, WeightReceiver, state_checksum
from areal_async.weight_sync.transports import MAX_HEADER_BYTES


class ScriptedGroup:
    """A process group's surface whose receives return scripted tensors (what a peer would have sent)."""

    def __init__(self, rank: int, incoming: list[torch.Tensor]) -> None:
        self._rank, self.incoming, self.sent = rank, list(incoming), []

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return 2

    def name(self) -> str:
        return "gloo"

    def send(self, tensors, dst, tag):
        self.sent.append(tensors[0].clone())
        return self

    def recv(self, tensors, src, tag):
        tensors[0].copy_(self.incoming.pop(0).reshape(tensors[0].shape))
        return self

    def broadcast(self, tensors, options):
        return self

    def wait(self) -> bool:
        return True


def _state() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(weight=torch.arange(12, dtype=torch.float32).reshape(3, 4), bias=torch.ones(4))


def _publisher(incoming: list[torch.Tensor]) -> tuple[WeightPublisher, ScriptedGroup]:
    group = ScriptedGroup(0, incoming)
    publisher = WeightPublisher(_state(), TorchDistributedTransport(group, torch.device("cpu")))
    publisher.stage(_state(), 0)
    return publisher, group


def _int(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


@pytest.mark.parametrize("held", [99, -2])
def test_a_held_version_out_of_range_breaks_the_round(held):
    publisher, _ = _publisher([_int(held)])
    with pytest.raises(BrokenRound, match=rf"rank 1 sent a held version {held}, outside \[-1, 0\]"):
        publisher.offer()


def test_an_unknown_acknowledgement_breaks_the_round():
    publisher, _ = _publisher([_int(-1), _int(7)])  # a snapshot goes out, then garbage comes back
    with pytest.raises(BrokenRound, match="rank 1 sent an acknowledgement 7, outside"):
        publisher.offer()


@pytest.mark.parametrize("incoming, message", [
    ([_int(MAX_HEADER_BYTES + 1)], "a header length"),
    ([_int(0)], "a header length 0"),
    ([_int(3), torch.tensor([0xC1, 0xC1, 0xC1], dtype=torch.uint8)], "did not decode"),  # 0xC1: never msgpack
    ([_int(2), torch.tensor([0x91, 0x01], dtype=torch.uint8)], "not a header"),  # msgpack's [1]
])
def test_a_header_that_cannot_be_right_breaks_the_round(incoming, message):
    receiver = WeightReceiver(_state(), TorchDistributedTransport(ScriptedGroup(1, incoming), torch.device("cpu")))
    with pytest.raises(BrokenRound, match=message):
        receiver.sync()


class Counting:
    """A gloo group that records the sizes of what it sends and broadcasts."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.sent, self.broadcast_bytes = group, [], []

    def __getattr__(self, name):
        return getattr(self.group, name)

    def send(self, tensors, dst, tag):
        self.sent.append(tensors[0].numel() * tensors[0].element_size())
        return self.group.send(tensors, dst, tag)

    def broadcast(self, tensors, options):
        self.broadcast_bytes.append(tensors[0].numel() * tensors[0].element_size())
        return self.group.broadcast(tensors, options)


def test_control_messages_travel_over_the_control_group_and_buckets_over_the_data_group():
    store = dist.HashStore()
    state, received, errors = _state(), OrderedDict((k, torch.zeros_like(v)) for k, v in _state().items()), []
    groups = {}

    def member(rank: int) -> None:
        try:
            data = Counting(dist.ProcessGroupGloo(dist.PrefixStore("data/", store), rank, 2, timedelta(seconds=30)))
            control = Counting(dist.ProcessGroupGloo(dist.PrefixStore("control/", store), rank, 2,
                                                     timedelta(seconds=30)))
            groups[rank] = (data, control)
            transport = TorchDistributedTransport(data, torch.device("cpu"), control=control)
            if rank == 0:
                WeightPublisher(state, transport, bucket_bytes=32).publish(state, 0, receivers=[1])
            else:
                WeightReceiver(received, transport).sync()
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=member, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert state_checksum(received) == state_checksum(state)
    (publisher_data, publisher_control), (receiver_data, receiver_control) = groups[0], groups[1]
    # the data group moved the snapshot's buckets, the state's 64 bytes of bits (a broadcast each), and nothing else
    assert publisher_data.broadcast_bytes == receiver_data.broadcast_bytes and sum(receiver_data.broadcast_bytes) == 64
    assert publisher_data.sent == receiver_data.sent == []
    # the control group: the receiver's held version and acknowledgement, the publisher's header length and header
    assert receiver_control.sent == [8, 8] and publisher_control.sent[0] == 8 and len(publisher_control.sent) == 2
    assert not publisher_control.broadcast_bytes and not receiver_control.broadcast_bytes
