"""A learner rank as a process of its own (a Ray actor in a run): an FSDPLearner over the run's learner world
(areal_async/actor_system/process_groups.py). Rank 0 also publishes each version to the rollout workers over the current
weight-sync group; workers never see a shard, since rank 0 gathers the full weights one parameter at a time
first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from areal_async.config import TrainConfig
from areal_async.model import load_pretrained, load_tokenizer
from areal_async.actor_system.process_groups import SyncGroup, close_sync_group, join_learner_world, open_sync_group
from areal_async.types import Trajectory
from areal_async.weight_sync import WeightPublisher
from learners.fsdp_learner import FSDPLearner, compiles_layers

# train_step/publish, abort_sync while a publish round waits for a dead worker, the liveness sentinel, pid
CONCURRENT_CALLS = 4


class LearnerRank:
    """One FSDP learner rank. Every method but `abort_sync` and `alive` is called on all ranks together (they
    run collectives); the driver splits each step's batch with `split_step_across_ranks` and hands every rank
    its share."""

    def __init__(self, rank: int, config: TrainConfig, model_path: str) -> None:
        self.rank = rank
        self.config = config
        self.model_path = model_path
        self.sync_group: SyncGroup | None = None
        self.sync_epoch = -1
        self.sync_lock = threading.Lock()  # one round (or group change) at a time; abort_sync does not wait
        self.closed = threading.Event()

    def connect(self, world_size: int, backend: str, version: int, checkpoint: str | None,
                store_address: tuple[str, int], sync_size: int) -> int:
        """Joins the learner world, shards the policy (restored from `checkpoint` if given), and (rank 0) opens
        weight-sync epoch 0 with the workers and publishes `version` to them. Returns the number of ranks."""
        cluster = self.config.cluster
        torch.set_num_threads(cluster.torch_threads_per_worker)
        device = torch.device(self.config.device)
        if device.type == "cuda":  # Ray makes the rank's GPU the only visible one
            device = torch.device("cuda", torch.cuda.current_device())
        self.backend, self.store_address, self.sync_size = backend, tuple(store_address), sync_size
        self.group = join_learner_world(self.store_address, world_size, self.rank, backend)
        self.learner = FSDPLearner(
            load_pretrained(self.model_path, torch.float32),
            self.config.ppo,
            pad_token_id=load_tokenizer(self.model_path).pad_token_id,
            temperature=self.config.generation.temperature,
            device=device,
            version=version,
            compile_layers=compiles_layers(self.config.ppo, device),
            group=self.group,
            compute_dtype=getattr(torch, self.config.model.dtype),
            publish_dtype=getattr(torch, self.config.model.dtype),  # what the rollout engines hold
            learner_config=self.config.learner,
        )
        if checkpoint is not None:
            self.learner.load_state(Path(checkpoint))
        state = self.published_state()
        self.publisher = None
        if self.rank == 0:
            self.sync_group = open_sync_group(self.store_address, 0, 0, sync_size, backend, cluster.sync_timeout_s)
            self.sync_epoch = 0
            self.publisher = WeightPublisher(state, self.sync_group.transport())
        self.publish(version, state)
        return dist.get_world_size(self.group)

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> dict[str, float]:
        """This rank's share of one training step; the stats are over all ranks."""
        return self.learner.train_step(trajectories, advantages)

    def published_state(self) -> dict[str, torch.Tensor]:
        """The full weights in the rollout engines' dtype on rank 0 (empty elsewhere); a collective."""
        return self.learner.policy_state()

    def publish(self, version: int, state: dict[str, torch.Tensor] | None = None) -> dict:
        """Rank 0 publishes `version` to the workers (each joins at its next token boundary). A round that
        breaks (a worker died, or `abort_sync`) leaves `version` staged for the next epoch's group:
        {"published": False, "error": ...}."""
        state = self.published_state() if state is None else state
        if self.publisher is None:
            return {"published": True}
        with self.sync_lock:
            self.publisher.stage(state, version)
            return self._offer()

    def _offer(self) -> dict:
        if self.sync_group is None:  # the last round broke and the driver has not opened the next epoch yet
            return {"published": False, "error": "no weight-sync group", "epoch": self.sync_epoch}
        try:
            return {"published": True, **self.publisher.offer()}
        except RuntimeError as error:  # the group lost a member: the driver opens the next epoch
            self._leave_epoch()  # workers still waiting in this round fail at once
            return {"published": False, "error": f"{type(error).__name__}: {error}", "epoch": self.sync_epoch}

    def _leave_epoch(self) -> None:
        if self.sync_group is not None:
            close_sync_group(self.sync_group)
        self.sync_group = self.publisher.transport = None

    def abort_sync(self, before_epoch: int) -> None:
        """Makes a round waiting in a weight-sync group older than `before_epoch` fail (NCCL; a gloo round fails
        when its peers leave). Reads the group before the epoch, which `open_sync_epoch` sets first: a new group
        is never aborted."""
        group = self.sync_group
        if group is not None and self.sync_epoch < before_epoch:
            close_sync_group(group)

    def open_sync_epoch(self, epoch: int) -> dict:
        """Rank 0: replaces the weight-sync group by epoch `epoch`'s (every worker joins it) and offers it the
        staged version, so a replacement worker gets a snapshot and the others what they miss."""
        with self.sync_lock:
            self._leave_epoch()
            group = open_sync_group(self.store_address, epoch, 0, self.sync_size, self.backend,
                                    self.config.cluster.sync_timeout_s)
            self.sync_epoch, self.sync_group = epoch, group
            self.publisher.transport = group.transport()
            return self._offer()

    def full_state(self) -> dict[str, torch.Tensor]:
        """The published weights on the CPU, for the driver's evaluation and export (rank 0; empty elsewhere)."""
        return {name: tensor.cpu() for name, tensor in self.published_state().items()}

    def save_state(self, staging: str) -> None:
        """Writes this rank's part of a run checkpoint into the staging folder."""
        self.learner.save_state(Path(staging))

    def pid(self) -> int:
        return os.getpid()

    def alive(self) -> None:
        """Returns when the rank closes: the driver holds this call to learn at once that the rank died."""
        self.closed.wait()

    def close(self) -> None:
        self.closed.set()
        dist.destroy_process_group()
