"""A rollout worker process (run as a Ray actor): engine, verifier and weight receiver, generating until
the controller says stop. It meets the learner only through areal_async services and the weight-sync group."""

from __future__ import annotations

import os
import time

import torch

from actors.engine_factory import EngineWeights, build_engine
from actors.rollout import build_rollout_worker
from areal_async.config import TrainConfig
from areal_async.model import load_tokenizer
from areal_async.actor_system.process_groups import close_sync_group, open_sync_group, sync_rank
from areal_async.reward import build_verifier
from areal_async.weight_sync import WeightReceiver, WeightSyncError, state_checksum

VERSION_POLL_INTERVAL_S = 0.02  # how often a decoding worker asks whether a newer version exists
IDLE_SLEEP_S = 0.01
EPOCH_POLL_S = 0.05
CONCURRENT_CALLS = 3  # run, abort_sync while run waits in a broken round, pid


class RolloutActor:
    """`controller` and `queue` are objects with the ControllerService / queue-router methods (Ray proxies
    in a cluster). A member of the weight-sync group of the current epoch (areal_async/actor_system/process_groups.py),
    whose rank 0 is learner rank 0: the controller's `sync_state` says when the driver opened a new one."""

    def __init__(self, worker_index: int, config: TrainConfig, model_path: str, controller, queue) -> None:
        self.worker_index = worker_index
        self.config = config
        self.model_path = model_path
        self.controller = controller
        self.queue = queue
        self.last_poll = 0.0
        self.weight_sync_seconds = 0.0
        self.rounds = 0
        self.sync_group = None
        self.sync_epoch = -1

    def connect(self, store_address: tuple[str, int], epoch: int, sync_size: int, backend: str) -> int:
        """Builds the engine, joins weight-sync epoch `epoch` and receives a snapshot; returns its version."""
        cluster = self.config.cluster
        torch.set_num_threads(cluster.torch_threads_per_worker)
        self.store_address, self.sync_size, self.backend = tuple(store_address), sync_size, backend
        tokenizer = load_tokenizer(self.model_path)
        dtype = self.config.model.dtype
        kind = self.config.rollout.engine.value
        # vLLM would take this process's torch.distributed world (the run's) for its own: its engine core runs
        # in a child process instead, and weight updates reach it as a pickled call.
        options = {"multiprocessing": True} if kind == "vllm" else {}
        if kind == "torch":
            options["settings"] = self.config.engine
        engine = build_engine(kind, self.model_path, dtype, cluster.rollout_device,
                              pad_token_id=tokenizer.pad_token_id, seed=self.config.seed + self.worker_index, **options)
        self.weights = EngineWeights(engine, self.model_path, dtype)
        self.verifier = build_verifier(self.config.reward, num_workers=1)
        self.worker = build_rollout_worker(self.config, engine, tokenizer, self.verifier, worker_id=self.worker_index)
        self.receiver = WeightReceiver(self.weights.tensors, transport=None)
        self._join_epoch(epoch)
        return engine.version

    def _leave_epoch(self) -> None:
        """Drops the weight-sync group, so that a member waiting on this worker in it fails at once."""
        if self.sync_group is not None:
            close_sync_group(self.sync_group)
        self.sync_group = self.receiver.transport = None

    def _join_epoch(self, epoch: int) -> None:
        """Leaves the current weight-sync group, joins epoch `epoch`'s (with the publisher and every other
        worker) and takes the version the publisher offers it on opening."""
        self._leave_epoch()
        group = open_sync_group(self.store_address, epoch, sync_rank(self.worker_index), self.sync_size,
                                self.backend, self.config.cluster.sync_timeout_s)
        self.sync_epoch, self.sync_group = epoch, group  # the epoch first: see abort_sync
        self.receiver.transport = group.transport()
        self._sync()

    def _sync(self) -> None:
        started = time.perf_counter()
        try:
            self.weights.applied(self.receiver.sync())
        except WeightSyncError:
            raise
        except RuntimeError:  # the round broke (a member died): the driver opens the next epoch
            self._leave_epoch()
            self._join_epoch(self._next_epoch())
        self.weight_sync_seconds += time.perf_counter() - started

    def _next_epoch(self) -> int:
        deadline = time.monotonic() + self.config.cluster.sync_timeout_s
        while (epoch := self.controller.sync_state()[1]) <= self.sync_epoch:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.worker_index}: weight-sync epoch {self.sync_epoch} broke and no "
                                   f"new one opened within cluster.sync_timeout_s={self.config.cluster.sync_timeout_s}")
            time.sleep(EPOCH_POLL_S)
        return epoch

    def weight_update(self, force: bool = False) -> bool:
        """Called at token boundaries: joins a new weight-sync epoch, or the publish round of a newer version."""
        now = time.monotonic()
        if not force and now - self.last_poll < VERSION_POLL_INTERVAL_S:
            return False
        self.last_poll = now
        version, epoch = self.controller.sync_state()
        if epoch > self.sync_epoch:
            self._join_epoch(epoch)
            return True
        if version <= self.worker.engine.version:
            return False
        self._sync()
        return True

    def abort_sync(self, before_epoch: int) -> None:
        """Makes a round waiting in a weight-sync group older than `before_epoch` fail (NCCL; a gloo round fails
        when its peers leave). Reads the group before the epoch, which `_join_epoch` sets first: a new group is
        never aborted."""
        group = self.sync_group
        if group is not None and self.sync_epoch < before_epoch:
            close_sync_group(group)

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> dict:
        """Generates until stopped; returns this worker's totals."""
        config = self.config
        tokens = groups = errors = 0
        while not self.controller.should_stop():
            result = self.worker.produce(
                self.controller, self.queue, config.generation, config.rollout.groups_per_request,
                seed=config.seed * 1_000_003 + self.worker_index * 10_007 + self.rounds,
                weight_update=self.weight_update,
            )
            self.rounds += 1
            tokens, groups, errors = tokens + result["tokens"], groups + result["groups"], errors + result["errors"]
            if not result["groups"]:
                self.weight_update(force=True)
                time.sleep(IDLE_SLEEP_S)
        self.weight_update(force=True)  # the last published version's round includes this worker
        self.verifier.close()
        self.worker.close()
        return {
            "worker": self.worker_index, "groups": groups, "tokens": tokens, "errors": errors,
            "version": self.worker.engine.version, "weight_sync_seconds": self.weight_sync_seconds,
            "weights_checksum": state_checksum(self.weights.tensors),
        }
