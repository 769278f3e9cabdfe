"""A learner rank as a process of its own (a Ray actor in a run): an FSDPLearner over the learner group of
the run's world (areal_async/process_groups.py). Rank 0 also publishes each version to the rollout workers;
workers never see a shard, since rank 0 gathers the full weights one parameter at a time first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from areal_async.config import TrainConfig
from areal_async.model import load_pretrained, load_tokenizer
from areal_async.process_groups import join_run_world
from areal_async.types import Trajectory
from areal_async.weight_sync import TorchDistributedTransport, WeightPublisher
from learners.fsdp_learner import FSDPLearner, compiles_layers


class LearnerRank:
    """One FSDP learner rank. Every method is called on all ranks together (they run collectives); the
    driver splits each step's batch with `split_step_across_ranks` and hands every rank its share."""

    def __init__(self, rank: int, config: TrainConfig, model_path: str) -> None:
        self.rank = rank
        self.config = config
        self.model_path = model_path

    def connect(self, address: str, world_size: int, backend: str, version: int, checkpoint: str | None) -> int:
        """Joins the world, shards the policy (restored from `checkpoint` if given) and publishes `version`
        to the workers, which wait for it in their own `connect`. Returns the number of learner ranks."""
        cluster = self.config.cluster
        torch.set_num_threads(cluster.torch_threads_per_worker)
        device = torch.device(self.config.device)
        if device.type == "cuda":  # Ray makes the rank's GPU the only visible one
            device = torch.device("cuda", torch.cuda.current_device())
        self.group, sync_group = join_run_world(address, world_size, self.rank, backend, cluster.num_learner_ranks)
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
        )
        if checkpoint is not None:
            self.learner.load_state(Path(checkpoint))
        state = self.published_state()
        self.publisher = None
        if self.rank == 0:
            self.publisher = WeightPublisher(state, TorchDistributedTransport(sync_group))
        self.publish(version, state)
        return dist.get_world_size(self.group)

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> dict[str, float]:
        """This rank's share of one training step; the stats are over all ranks."""
        return self.learner.train_step(trajectories, advantages)

    def published_state(self) -> dict[str, torch.Tensor]:
        """The full weights in the rollout engines' dtype on rank 0 (empty elsewhere); a collective."""
        return self.learner.policy_state()

    def publish(self, version: int, state: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0 publishes `version` to the workers (each joins at its next token boundary)."""
        state = self.published_state() if state is None else state
        if self.publisher is not None:
            self.publisher.publish(state, version)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The published weights on the CPU, for the driver's evaluation and export (rank 0; empty elsewhere)."""
        return {name: tensor.cpu() for name, tensor in self.published_state().items()}

    def save_state(self, staging: str) -> None:
        """Writes this rank's part of a run checkpoint into the staging folder."""
        self.learner.save_state(Path(staging))

    def close(self) -> None:
        dist.destroy_process_group()
