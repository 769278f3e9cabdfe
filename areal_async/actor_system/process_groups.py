"""The torch.distributed groups of a Ray run.

The learner ranks 0..M-1 form the run's world: FSDP's all-gathers and reduce-scatters. They meet through the
store the driver hosts (under a prefix of their own), not one that rank 0 would host at the driver's address:
Ray may place rank 0 on another node. Weight publication runs in a group of its own: learner rank 0 (the publisher, its rank 0) and rollout worker i (its rank i + 1). That
group is standalone, built from a store the driver hosts, and numbered by an epoch: a group that lost a member
cannot be used again (its members would wait for the dead one), so when a worker dies the driver opens epoch
e + 1, whose members are the publisher, the live workers and the dead one's replacement.

A member leaves an epoch by dropping its group (`close_sync_group`, then no reference left). With gloo that
closes its connections, so a member still waiting on it in that epoch fails at once (gloo's own `abort` does not
wake a waiting thread, nor tell the peers); an NCCL group is aborted, which makes its pending operations fail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from areal_async.weight_sync import TorchDistributedTransport


def join_learner_world(store_address: tuple[str, int], world_size: int, rank: int, backend: str,
                       timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Joins the learner ranks' world through the driver's store at `store_address` (every learner rank calls
    this); returns its group."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    host, port = store_address
    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore("learner-world/", dist.TCPStore(host, port, is_master=False, timeout=timeout))
    dist.init_process_group(backend, store=store, world_size=world_size, rank=rank, timeout=timeout)
    return dist.group.WORLD


def host_store(host: str, port: int) -> dist.TCPStore:
    """The run's store, hosted by the driver for the whole run (keep the object alive): the learner world and the
    weight-sync groups meet through it."""
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))


def sync_rank(worker_index: int) -> int:
    """Rollout worker `worker_index`'s rank in every weight-sync group."""
    return worker_index + 1


@dataclass(frozen=True)
class SyncGroup:
    """One epoch's weight-sync group: `data` moves the bucket bytes, `control` the versions, headers and
    acknowledgements (gloo: with NCCL a wait does not raise, and a control value read after an abort can be
    garbage; with gloo both are the same group)."""

    data: dist.ProcessGroup
    control: dist.ProcessGroup

    def transport(self) -> TorchDistributedTransport:
        return TorchDistributedTransport(self.data, control=self.control if self.control is not self.data else None)


def open_sync_group(store_address: tuple[str, int], epoch: int, rank: int, size: int, backend: str,
                    timeout_s: float) -> SyncGroup:
    """Epoch `epoch`'s weight-sync group of `size` members (every member calls this; it returns once all have).
    Operations on it fail after `timeout_s` (gloo fails at once when a member's process is gone)."""
    host, port = store_address
    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(f"sync-epoch-{epoch}/", dist.TCPStore(host, port, is_master=False, timeout=timeout))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        control = dist.ProcessGroupGloo(dist.PrefixStore("control/", store), rank, size, timeout)
        return SyncGroup(dist.ProcessGroupNCCL(store, rank, size, options), control)
    group = dist.ProcessGroupGloo(store, rank, size, timeout)
    return SyncGroup(group, group)


def close_sync_group(group: SyncGroup) -> None:
    """Makes `group`'s pending operations fail (NCCL: abort); the caller then drops its last reference, which
    closes the gloo groups' connections."""
    if "nccl" in group.data.name().lower():
        group.data.abort()
