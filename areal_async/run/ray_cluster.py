"""The Ray side of a run: controller, queue shards, learner ranks and rollout workers as actors.

`ray.init()` starts a local instance when `cluster.address` is null (a laptop needs no cluster); an address
joins an existing cluster. The driver holds no weights that train: it moves batches from the queue to the
learner ranks and tells them when to publish. The learner ranks form a torch.distributed world; learner rank
0 and the workers meet in a weight-sync group of the current epoch (areal_async/actor_system/process_groups.py), built from
a store the driver hosts.

Faults. A dead rollout worker is noticed at the driver's next look (it looks every few milliseconds while it
waits for batches or for a publish round): the groups it held are settled (delivered if the queue got them,
else handed out again, counted as readmitted by "worker_died"), a replacement starts, and a new weight-sync
epoch opens without the dead process, in which the publisher offers the current version (a snapshot for the
replacement). A worker that keeps dying (cluster.max_worker_restarts within cluster.worker_restart_window_s)
stops the run. A dead learner rank, controller or queue shard stops the run with ActorDied naming it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from actors.rollout_actor import CONCURRENT_CALLS as WORKER_CALLS
from actors.rollout_actor import RolloutActor
from areal_async.config import ClusterConfig, TrainConfig
from areal_async.actor_system.controller import RolloutController
from areal_async.actor_system.process_groups import host_store
from areal_async.actor_system.replay_queue import ReplayQueueShard, ShardedReplayQueue, shard_log_path
from areal_async.actor_system.runtime import ActorDied, ControllerService, RayProxy, WorkerKeepsDying, describe_death
from areal_async.types import Trajectory
from learners.fsdp_learner import split_step_across_ranks
from learners.learner_rank import CONCURRENT_CALLS as LEARNER_CALLS
from learners.learner_rank import LearnerRank

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


POLL_S = 0.005  # how often the driver looks at the actors while it waits
DEATH_NOTICE_S = 30.0  # how long a publish round that broke may wait for the driver to see which worker died


def gather(refs: list, names: Sequence[str]) -> list:
    """ray.get of `refs` (calls on the actors `names`), raising ActorDied for an actor that died. A call that
    failed because another actor died (its collective lost a member) reports the dead one."""
    import ray

    pending = list(refs)
    while pending:
        (ref,), pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as error:
            raise ActorDied.of(names[refs.index(ref)], error) from error
        except Exception:
            others, _ = ray.wait(pending, num_returns=len(pending), timeout=5.0) if pending else ([], [])
            for other in others:
                try:
                    ray.get(other)
                except ray.exceptions.RayActorError as error:
                    raise ActorDied.of(names[refs.index(other)], error) from error
                except Exception:  # noqa: BLE001 - the first failure is the one raised below
                    pass
            raise
    return ray.get(list(refs))


class RayLearnerGroup:
    """The learner rank actors seen as one learner (what the trainer calls on an in-process PPOLearner)."""

    def __init__(self, ranks: list) -> None:
        self.ranks = ranks
        self.names = [f"learner rank {index}" for index in range(len(ranks))]
        self.version = 0
        self.checkpoint: Path | None = None  # set by load_state before the ranks start

    def _all(self, method: str, *args) -> list:
        return gather([getattr(rank, method).remote(*args) for rank in self.ranks], self.names)

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> dict[str, float]:
        """A token-balanced share of the batch per rank, one synchronous step on all."""
        shares = split_step_across_ranks(trajectories, advantages, len(self.ranks))
        stats = gather([rank.train_step.remote(share.trajectories, share.advantages)
                        for rank, share in zip(self.ranks, shares)], self.names)[0]
        self.version += 1
        return stats

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self._all("full_state")[0]

    def save_state(self, staging: Path) -> None:
        self._all("save_state", str(staging))

    def load_state(self, path: Path) -> None:
        """The ranks load `path` when `RayCluster.start` connects them."""
        self.checkpoint = path

    def close(self) -> None:
        self._all("close")


class RayCluster:
    """Rollout workers generating concurrently with the learner ranks, fed by an admission controller actor.

    Construction creates the actors; `start` (after any state was restored into the controller and queue
    proxies) connects them, publishes the first version and sets the workers generating. `events` collects
    what happened to the workers (each restart), for the run's metrics."""

    def __init__(self, config: TrainConfig, model_path: str, controller: RolloutController, log_dir: str | None,
                 max_generation_attempts: int, max_repeated_errors: int) -> None:
        import ray

        os.environ.update(WORKER_ENV)
        self.config = config
        self.model_path = str(model_path)
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
                               keep_receipts=True)
            for index in range(rollout.num_queue_shards)
        ]
        self.controller = RayProxy(self.controller_handle, "the controller actor")
        self.queue = ShardedReplayQueue.over([RayProxy(handle, f"replay queue shard {index}")
                                              for index, handle in enumerate(self.shard_handles)])
        rank_actor = ray.remote(num_cpus=cluster.cpus_per_learner_rank, num_gpus=cluster.gpus_per_learner_rank,
                                max_concurrency=LEARNER_CALLS)(LearnerRank)
        self.learner = RayLearnerGroup(
            [rank_actor.remote(rank, config, self.model_path) for rank in range(cluster.num_learner_ranks)]
        )
        self.worker_actor = ray.remote(num_cpus=cluster.cpus_per_rollout_worker,
                                       num_gpus=cluster.gpus_per_rollout_worker,
                                       max_concurrency=WORKER_CALLS)(RolloutActor)
        self.workers = [self._new_worker(index) for index in range(cluster.num_rollout_workers)]
        self.backend = "nccl" if torch.device(config.device).type == "cuda" else "gloo"
        # the learner world and the weight-sync groups meet through this store, on the driver's node
        self.store_address = (ray.util.get_node_ip_address(), _free_port())
        self.store = host_store(*self.store_address)
        self.sync_epoch = 0
        self.running: list = []  # each worker's `run` call
        self.sentinels: list = []  # each learner rank's `alive` call: it returns only if the rank dies
        self.deaths: list[float] = []  # when workers died, within the restart window
        self.restarts = 0
        self.events: list[dict] = []

    def _new_worker(self, index: int):
        return self.worker_actor.remote(index, self.config, self.model_path, self.controller, self.queue)

    @property
    def sync_size(self) -> int:
        return 1 + len(self.workers)

    def start(self) -> None:
        """Connects learner ranks and workers, publishes `learner.version` (of the policy restored by
        `learner.load_state`, if it was called) and starts generation."""
        version, checkpoint = self.learner.version, self.learner.checkpoint
        connected = [
            rank.connect.remote(len(self.learner.ranks), self.backend, version,
                                str(checkpoint) if checkpoint else None, self.store_address, self.sync_size)
            for rank in self.learner.ranks
        ] + [worker.connect.remote(self.store_address, 0, self.sync_size, self.backend) for worker in self.workers]
        gather(connected, self.learner.names + [f"rollout worker {index}" for index in range(len(self.workers))])
        self.running = [worker.run.remote() for worker in self.workers]
        self.sentinels = [rank.alive.remote() for rank in self.learner.ranks]

    def publish(self, version: int) -> None:
        """Announces `version` and runs its publish round (every worker joins at its next token boundary). A
        round broken by a worker's death is completed by the replacement's epoch, which offers `version`."""
        import ray

        self.controller.set_version(version)
        refs = [rank.publish.remote(version) for rank in self.learner.ranks]
        while len(ray.wait(refs, num_returns=len(refs), timeout=POLL_S)[0]) < len(refs):
            self.check_actors()
        result = gather(refs, self.learner.names)[0]
        deadline = time.monotonic() + DEATH_NOTICE_S
        while not result["published"] and self.sync_epoch <= result["epoch"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"publishing version {version} broke ({result['error']}) and no rollout worker died")
            self.check_actors()
            time.sleep(POLL_S)

    def check_actors(self) -> None:
        """Replaces a rollout worker that died; raises ActorDied for a learner rank that died, or the error of a
        worker that stopped on its own."""
        import ray

        died, _ = ray.wait(self.sentinels, num_returns=len(self.sentinels), timeout=0)
        if died:
            gather(died, [self.learner.names[self.sentinels.index(ref)] for ref in died])
            raise ActorDied(f"{self.learner.names[self.sentinels.index(died[0])]} stopped")
        finished, _ = ray.wait(self.running, num_returns=len(self.running), timeout=0)
        for ref in finished:
            index = self.running.index(ref)
            try:
                ray.get(ref)  # re-raises the worker's own exception
            except ray.exceptions.RayActorError as error:
                self.replace_worker(index, describe_death(error))
                continue
            raise RuntimeError(f"rollout worker {index} stopped before the run ended")

    def replace_worker(self, index: int, cause: str) -> None:
        """Settles the groups dead worker `index` held, starts its replacement and opens a weight-sync epoch
        with it, in which the publisher offers the current version."""
        import ray

        started = time.monotonic()
        cluster = self.config.cluster
        self.deaths = [t for t in self.deaths if started - t <= cluster.worker_restart_window_s] + [started]
        if len(self.deaths) > cluster.max_worker_restarts:
            raise WorkerKeepsDying(
                f"rollout worker {index} died ({cause}): {len(self.deaths)} rollout worker deaths within "
                f"cluster.worker_restart_window_s={cluster.worker_restart_window_s:g} exceed "
                f"cluster.max_worker_restarts={cluster.max_worker_restarts}"
            )
        held = self.controller.held_by(index)
        settled = self.controller.release_worker(index, self.queue.receipts_for(held))
        settled.update(held=len(held), unsettled=len(self.controller.held_by(index)))  # unsettled: 0 by design
        self.sync_epoch += 1
        self.controller.set_sync_epoch(self.sync_epoch)  # live workers join the new epoch at their next look
        for actor in [self.learner.ranks[0], *(w for i, w in enumerate(self.workers) if i != index)]:
            actor.abort_sync.remote(self.sync_epoch)  # a round waiting in the old group fails at once
        ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self._new_worker(index)
        gather([self.learner.ranks[0].open_sync_epoch.remote(self.sync_epoch),
                self.workers[index].connect.remote(self.store_address, self.sync_epoch, self.sync_size,
                                                   self.backend)],
               [self.learner.names[0], f"rollout worker {index} (replacement)"])
        self.running[index] = self.workers[index].run.remote()
        self.restarts += 1
        event = {"event": "rollout_worker_replaced", "worker": index, "cause": cause, **settled,
                 "sync_epoch": self.sync_epoch, "restarts": self.restarts,
                 "recovery_seconds": time.monotonic() - started}
        print(f"[areal-async] rollout worker {index} died ({cause}): {settled['readmitted']} groups "
              f"handed out again, {settled['delivered']} delivered; replaced in {event['recovery_seconds']:.1f} s "
              f"(weight-sync epoch {self.sync_epoch})", flush=True)
        self.events.append(event)

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

    def abort(self) -> None:
        """Kills every actor of the run (after one of them died: nothing can be stopped in order)."""
        import ray

        for actor in [*self.workers, *self.learner.ranks, self.controller_handle, *self.shard_handles]:
            ray.kill(actor, no_restart=True)
