"""The Ray side of a run: controller, queue shards and rollout workers as actors, and the weight-sync group.

`ray.init()` starts a local instance when `cluster.address` is null (a laptop needs no cluster); an address
joins an existing cluster. The learner stays in the driver as rank 0 of the weight-sync group.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from areal_async.config import TrainConfig
from areal_async.controller import RolloutController
from areal_async.replay_queue import ReplayQueueShard, ShardedReplayQueue, shard_log_path
from areal_async.runtime import ControllerService, RayProxy
from areal_async.weight_sync import TorchDistributedTransport, WeightPublisher

# Set in every process of a run (NVLink multicast stays off on the lent machines).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
              "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class RayRollout:
    """Rollout workers generating concurrently with the learner, fed by an admission controller actor."""

    def __init__(self, config: TrainConfig, model_path: str, controller: RolloutController, log_dir: str | None,
                 learner_params: dict[str, torch.Tensor], max_generation_attempts: int) -> None:
        import ray

        from actors.rollout_actor import RolloutActor

        os.environ.update(WORKER_ENV)
        cluster, rollout = config.cluster, config.rollout
        if not ray.is_initialized():
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": WORKER_ENV})
        self.controller_handle = ray.remote(num_cpus=0)(ControllerService).remote(controller, max_generation_attempts)
        shard_actor = ray.remote(num_cpus=0)(ReplayQueueShard)
        self.shard_handles = [
            shard_actor.remote(index, rollout.queue_capacity_per_shard, rollout.max_staleness,
                               shard_log_path(log_dir, index),
                               filter_zero_variance=config.ppo.filter_zero_variance_groups)
            for index in range(rollout.num_queue_shards)
        ]
        self.controller = RayProxy(self.controller_handle)
        self.queue = ShardedReplayQueue.over([RayProxy(handle) for handle in self.shard_handles])
        worker_actor = ray.remote(num_cpus=cluster.cpus_per_rollout_worker, num_gpus=cluster.gpus_per_rollout_worker)(
            RolloutActor
        )
        self.workers = [
            worker_actor.remote(index, config, str(model_path), self.controller, self.queue)
            for index in range(cluster.num_rollout_workers)
        ]
        backend = "nccl" if str(cluster.rollout_device).startswith("cuda") else "gloo"
        address = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        connected = [w.connect.remote(address, len(self.workers) + 1, backend) for w in self.workers]
        dist.init_process_group(backend, init_method=address, world_size=len(self.workers) + 1, rank=0)
        self.publisher = WeightPublisher(learner_params, TorchDistributedTransport())
        self.publisher.publish(learner_params, version=0)
        ray.get(connected)
        self.running = [w.run.remote() for w in self.workers]

    def publish(self, learner_params: dict[str, torch.Tensor], version: int) -> None:
        """Announces `version` and runs its publish round (every worker joins at its next token boundary)."""
        self.controller.set_version(version)
        self.publisher.publish(learner_params, version)

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
        dist.destroy_process_group()
        return results
