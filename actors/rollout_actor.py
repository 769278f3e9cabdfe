"""A rollout worker process (run as a Ray actor): engine, verifier and weight receiver, generating until
the controller says stop. It meets the learner only through areal_async services and the weight group."""

from __future__ import annotations

import time

import torch

from actors.engine_factory import EngineWeights, build_engine
from actors.rollout import RolloutWorker
from areal_async.config import TrainConfig
from areal_async.model import load_tokenizer
from areal_async.process_groups import join_run_world
from areal_async.reward import RewardVerifier
from areal_async.weight_sync import TorchDistributedTransport, WeightReceiver, state_checksum

VERSION_POLL_INTERVAL_S = 0.02  # how often a decoding worker asks whether a newer version exists
IDLE_SLEEP_S = 0.01


class RolloutActor:
    """`controller` and `queue` are objects with the ControllerService / queue-router methods (Ray proxies
    in a cluster). A member of the weight-sync group, whose rank 0 is learner rank 0."""

    def __init__(self, worker_index: int, config: TrainConfig, model_path: str, controller, queue) -> None:
        self.worker_index = worker_index
        self.config = config
        self.model_path = model_path
        self.controller = controller
        self.queue = queue
        self.last_poll = 0.0
        self.weight_sync_seconds = 0.0
        self.rounds = 0

    def connect(self, address: str, world_size: int, backend: str, rank: int, num_learner_ranks: int) -> int:
        """Joins the run's world as `rank` and receives the first snapshot; returns the version it holds."""
        cluster = self.config.cluster
        torch.set_num_threads(cluster.torch_threads_per_worker)
        _, sync_group = join_run_world(address, world_size, rank, backend, num_learner_ranks)
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
        self.verifier = RewardVerifier.from_config(self.config.reward, num_workers=1)
        decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
        self.worker = RolloutWorker(engine, decode, self.verifier, [tokenizer.eos_token_id])
        self.receiver = WeightReceiver(self.weights.tensors, TorchDistributedTransport(sync_group))
        self._sync()
        return engine.version

    def _sync(self) -> None:
        started = time.perf_counter()
        self.weights.applied(self.receiver.sync())
        self.weight_sync_seconds += time.perf_counter() - started

    def weight_update(self, force: bool = False) -> bool:
        """Called at token boundaries: joins the publish round of a newer version if there is one."""
        now = time.monotonic()
        if not force and now - self.last_poll < VERSION_POLL_INTERVAL_S:
            return False
        self.last_poll = now
        if self.controller.current_version() <= self.worker.engine.version:
            return False
        self._sync()
        return True

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
        return {
            "worker": self.worker_index, "groups": groups, "tokens": tokens, "errors": errors,
            "version": self.worker.engine.version, "weight_sync_seconds": self.weight_sync_seconds,
            "weights_checksum": state_checksum(self.weights.tensors),
        }
