"""The Ray side of a run: controller, queue shards, learner ranks and rollout workers as actors.

`ray.init()` starts a local instance when `cluster.address` is null (a laptop needs no cluster); an address
joins an existing cluster. The driver holds no weights that train: it moves batches from the queue to the
learner ranks and tells them when to publish. Learner ranks and workers share one torch.distributed world
(see learners/learner_rank.py for its groups).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch

from areal_async.config import ClusterConfig, TrainConfig
from areal_async.controller import RolloutController
from areal_async.replay_queue import ReplayQueueShard, ShardedReplayQueue, shard_log_path
from areal_async.runtime import ControllerService, RayProxy
from areal_async.types import Trajectory

# Set in every process of a run (NVLink multicast stays off on the lent machines).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
              "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def check_resources(cluster: ClusterConfig, available: dict[str, float]) -> None:
    """Fails fast, naming the config keys, when the actors ask for more CPUs or GPUs than the Ray cluster
    has (Ray would otherwise wait for them forever)."""
    for resource, per_rank, per_worker in (
        ("CPU", cluster.cpus_per_learner_rank, cluster.cpus_per_rollout_worker),
        ("GPU", cluster.gpus_per_learner_rank, cluster.gpus_per_rollout_worker),
    ):
        needed = cluster.num_learner_ranks * per_rank + cluster.num_rollout_workers * per_worker
        if needed > available.get(resource, 0.0) + 1e-9:
            unit = resource.lower() + "s"
            raise ValueError(
                f"the run asks for {needed:g} {resource}s (cluster.num_learner_ranks={cluster.num_learner_ranks} x "
                f"cluster.{unit}_per_learner_rank={per_rank:g} + cluster.num_rollout_workers="
                f"{cluster.num_rollout_workers} x cluster.{unit}_per_rollout_worker={per_worker:g}) but the Ray "
                f"cluster has {available.get(resource, 0.0):g}"
            )


class RayLearnerGroup:
    """The learner rank actors seen as one learner (what the trainer calls on an in-process PPOLearner)."""

    def __init__(self, ranks: list, normalise_advantage_std: bool) -> None:
        self.ranks = ranks
        self.normalise_advantage_std = normalise_advantage_std
        self.version = 0
        self.checkpoint: Path | None = None  # set by load_state before the ranks start

    def _all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(rank, method).remote(*args) for rank in self.ranks])

    def train_step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """Advantages over the whole batch, a token-balanced share per rank, one synchronous step on all."""
        import ray

        from learners.fsdp_learner import split_step_across_ranks

        shares = split_step_across_ranks(trajectories, len(self.ranks), self.normalise_advantage_std)
        stats = ray.get([rank.train_step.remote(share.trajectories, share.advantages)
                         for rank, share in zip(self.ranks, shares)])[0]
        self.version += 1
        return stats

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self._all("full_state")[0]

    def save_state(self, staging: Path) -> None:
        self._all("save_state", str(staging))

    def load_state(self, path: Path) -> None:
        """The ranks load `path` when `RayCluster.start` connects them."""
        self.checkpoint = path

    def publish(self, version: int) -> None:
        """Rank 0 publishes `version` to the workers; the other ranks take part in gathering it."""
        self._all("publish", version)

    def close(self) -> None:
        self._all("close")


class RayCluster:
    """Rollout workers generating concurrently with the learner ranks, fed by an admission controller actor.

    Construction creates the actors; `start` (after any state was restored into the controller and queue
    proxies) connects the world, publishes the first version and sets the workers generating."""

    def __init__(self, config: TrainConfig, model_path: str, controller: RolloutController, log_dir: str | None,
                 max_generation_attempts: int, max_repeated_errors: int) -> None:
        import ray

        from actors.rollout_actor import RolloutActor
        from learners.learner_rank import LearnerRank

        os.environ.update(WORKER_ENV)
        self.config = config
        cluster, rollout = config.cluster, config.rollout
        if not ray.is_initialized():
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": WORKER_ENV})
        check_resources(cluster, ray.cluster_resources())
        self.controller_handle = ray.remote(num_cpus=0)(ControllerService).remote(controller, max_generation_attempts,
                                                                                 max_repeated_errors)
        shard_actor = ray.remote(num_cpus=0)(ReplayQueueShard)
        self.shard_handles = [
            shard_actor.remote(index, rollout.queue_capacity_per_shard, rollout.max_staleness,
                               shard_log_path(log_dir, index),
                               filter_zero_variance=config.ppo.filter_zero_variance_groups,
                               keep_receipts=config.checkpoint_every > 0)
            for index in range(rollout.num_queue_shards)
        ]
        self.controller = RayProxy(self.controller_handle)
        self.queue = ShardedReplayQueue.over([RayProxy(handle) for handle in self.shard_handles])
        rank_actor = ray.remote(num_cpus=cluster.cpus_per_learner_rank, num_gpus=cluster.gpus_per_learner_rank)(
            LearnerRank
        )
        self.learner = RayLearnerGroup(
            [rank_actor.remote(rank, config, str(model_path)) for rank in range(cluster.num_learner_ranks)],
            config.ppo.normalise_advantage_std,
        )
        worker_actor = ray.remote(num_cpus=cluster.cpus_per_rollout_worker, num_gpus=cluster.gpus_per_rollout_worker)(
            RolloutActor
        )
        self.workers = [
            worker_actor.remote(index, config, str(model_path), self.controller, self.queue)
            for index in range(cluster.num_rollout_workers)
        ]
        self.running: list = []

    def start(self) -> None:
        """Connects learner ranks and workers, publishes `learner.version` (of the policy restored by
        `learner.load_state`, if it was called) and starts generation."""
        import ray

        backend = "nccl" if torch.device(self.config.device).type == "cuda" else "gloo"
        address = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        num_ranks = len(self.learner.ranks)
        world_size = num_ranks + len(self.workers)
        version, checkpoint = self.learner.version, self.learner.checkpoint
        connected = [
            rank.connect.remote(address, world_size, backend, version, str(checkpoint) if checkpoint else None)
            for rank in self.learner.ranks
        ] + [
            worker.connect.remote(address, world_size, backend, num_ranks + index, num_ranks)
            for index, worker in enumerate(self.workers)
        ]
        ray.get(connected)
        self.running = [w.run.remote() for w in self.workers]

    def publish(self, version: int) -> None:
        """Announces `version` and runs its publish round (every worker joins at its next token boundary)."""
        self.controller.set_version(version)
        self.learner.publish(version)

    def check_workers(self) -> None:
        """Raises the error of a worker that stopped on its own."""
        import ray

        finished, _ = ray.wait(self.running, num_returns=len(self.running), timeout=0)
        for ref in finished:
            ray.get(ref)  # re-raises the worker's exception
        if finished:
            raise RuntimeError("a rollout worker stopped before the run ended")

    def stop(self) -> list[dict]:
        """Stops generation and returns every worker's totals (version, weight checksum, ...)."""
        import ray

        self.controller.stop()
        pending = list(self.running)
        while pending:  # a worker blocked on a full queue finishes once the queue has room
            self.queue.drain("shutdown")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
        results = ray.get(self.running)
        if self.running:  # the world exists only once started
            self.learner.close()
        return results
