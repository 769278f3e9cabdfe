"""The training run: controller -> rollout -> learner -> weight publication, with metrics and checkpoints.

The loop is written for the asynchronous system's invariants (admission by the staleness rule, per-token
versions, a conservation ledger); with max_staleness = 0 it is synchronous RL.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import shutil
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from actors.engine import TorchEngine
from actors.engine_factory import EngineWeights, build_engine
from actors.rollout import build_rollout_worker
from areal_async.config import DataKind, EngineKind, Objective, Placement, RewardKind, SFTConfig, TrainConfig
from areal_async.checkpointing import (
    commit_checkpoint,
    latest_run_checkpoint,
    read_trainer_state,
    restore_rng_state,
    rng_state,
    stage_checkpoint,
)
from areal_async.contracts import Controller, Learner, ReplayQueue
from areal_async.files import write_json_atomically, write_text_atomically
from areal_async.actor_system.controller import RolloutController, settle_deliveries
from areal_async.data import load_train_and_heldout
from areal_async.errors import InputError
from areal_async.actor_system.ledger import Ledger
from areal_async.actor_system.replay_queue import ShardedReplayQueue
from areal_async.planning.memory_plan import GIB, MemoryPlan
from areal_async.model import load_config, load_pretrained, load_tokenizer, save_weights_pretrained
from areal_async.objective import trajectory_advantages
from areal_async.planning.placement import inline_gpu_plan
from areal_async.prompts import encode_prompt
from areal_async.plots import plot_training_curves
from areal_async.reward import build_verifier
from areal_async.run.ray_cluster import RayCluster
from areal_async.run.sft import BUNDLED_WARMSTART, run_sft
from areal_async.actor_system.runtime import ActorDied, ControllerService, WorkerKeepsDying
from areal_async.types import PromptGroup, Trajectory
from areal_async.weight_sync import InProcessTransport, WeightPublisher, WeightReceiver, state_checksum
from evaluation import EvalSettings, evaluate, load_benchmarks
from learners.fsdp_learner import FSDPLearner, compiles_layers

EVAL_GROUPS_PER_CALL = 64
MAX_IDLE_ROUNDS = 1000  # rounds in which nothing was admitted, generated or taken
MAX_GENERATION_ATTEMPTS = 3  # a group whose generation fails this often is dropped
MAX_REPEATED_ERRORS = 3  # the same generation error this many times in a row stops the run
RAY_POLL_S = 0.005


class GenerationFailed(RuntimeError):
    """Generation keeps failing with the same error: the run stops with it (all errors are in the run folder)."""


class RunStopped(RuntimeError):
    """An actor the run cannot do without died (or rollout workers kept dying): the message names it and the
    run checkpoint that `resume=true` continues from."""


def resolve_model_path(config: TrainConfig) -> Path:
    """The configured checkpoint, or the bundled warm start (recreated by the SFT script if it is missing)."""
    if config.model.path:
        path = Path(config.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={path}: not a Hugging Face checkpoint folder (no config.json)")
        return path
    if not (BUNDLED_WARMSTART / "config.json").is_file():
        print(f"warm start missing at {BUNDLED_WARMSTART}; training one with `areal-async sft`'s defaults "
              "(about 9 minutes on 2 CPU cores; docs/getting-started.md)")
        run_sft(SFTConfig())
    return BUNDLED_WARMSTART


def validate(config: TrainConfig) -> None:
    """Errors that would otherwise surface deep inside a run."""
    if config.reward.correct_reward <= config.reward.incorrect_reward:
        raise ValueError("reward.correct_reward must be greater than reward.incorrect_reward")
    if config.reward.partial_credit and config.reward.kind is not RewardKind.code:
        raise ValueError("reward.partial_credit counts the tests passed: it needs reward.kind=code")
    if (config.data.kind in (DataKind.code_jsonl, DataKind.synthetic_code)) != (config.reward.kind is RewardKind.code):
        raise ValueError(f"data.kind={config.data.kind.value} with reward.kind={config.reward.kind.value}: code problems "
                         "(data.kind=code_jsonl or synthetic_code) are judged by their tests (reward.kind=code), and "
                         "only they")
    rollout = config.rollout
    if config.resume and not config.run_name:
        raise ValueError("resume=true needs run_name=<the run to continue>")
    cluster = config.cluster
    if config.rollout.engine is not EngineKind.torch and cluster.placement is not Placement.ray:
        raise ValueError(f"rollout.engine={config.rollout.engine.value} drives the rollout workers of "
                         "cluster.placement=ray; inline runs (and the driver's evaluation) use the built-in engine")
    if cluster.placement is Placement.ray:
        if torch.device(config.device).type != torch.device(cluster.rollout_device).type:
            raise ValueError(f"cluster.placement=ray: device={config.device} (learner ranks) and "
                             f"cluster.rollout_device={cluster.rollout_device} share one torch.distributed "
                             "world and must both be cpu (gloo) or both cuda (NCCL)")
        if cluster.num_learner_ranks < 1:
            raise ValueError("cluster.num_learner_ranks must be at least 1")
    if config.generation.group_size < 2 and config.ppo.filter_zero_variance_groups:
        raise ValueError("generation.group_size=1 makes every group zero-variance: set "
                         "ppo.filter_zero_variance_groups=false or sample more than one answer per prompt")
    if config.cluster.placement is Placement.inline:
        if rollout.max_staleness is None:
            raise ValueError("cluster.placement=inline needs a finite rollout.max_staleness")
        needed = (rollout.max_staleness + 1) * rollout.groups_per_step + rollout.groups_per_request
        if rollout.num_queue_shards * rollout.queue_capacity_per_shard < needed:
            raise ValueError(
                f"cluster.placement=inline: the queue holds {rollout.num_queue_shards} x "
                f"{rollout.queue_capacity_per_shard} groups but may need {needed}; raise rollout.queue_capacity_per_shard"
            )


def inert_clip_warning(config: TrainConfig) -> str | None:
    """Why ppo.eps_clip cannot act in this run (the ratio it clips is 1 at every update), or None."""
    ppo = config.ppo
    if ppo.minibatches_per_step > 1:
        return None
    fix = "set ppo.minibatches_per_step >= 2 (AReaL uses 4) for a trust region"
    if ppo.objective is Objective.decoupled:
        return (f"ppo.eps_clip cannot act: with ppo.minibatches_per_step=1 the step's one update runs at the "
                f"proximal weights, where pi_theta / pi_prox = 1; {fix}")
    if config.rollout.max_staleness == 0:
        return (f"ppo.eps_clip cannot act: ppo.objective=naive at rollout.max_staleness=0 and "
                f"ppo.minibatches_per_step=1 updates once at the weights that sampled the data; {fix}")
    return None


class SharedGpuMemory:
    """An inline run on one GPU: generation, training and publication take turns with its memory, as the plan
    counts them (areal_async/planning/memory_plan.py). Entering a phase frees what the last one cached (the engine's KV
    pool and decode graphs after generation, rebuilt by its next call) and returns the last phase's peak."""

    def __init__(self, engine: TorchEngine, device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.phase = "generation"

    def enter(self, phase: str) -> tuple[str, float]:
        """Starts `phase`; returns the phase that ended and its peak of allocated memory (GiB)."""
        ended, peak = self.phase, torch.cuda.max_memory_allocated(self.device) / GIB
        if ended == "generation":
            self.engine.release()
        torch.cuda.empty_cache()  # the cached blocks of the phase that ended go back for the next one's
        torch.cuda.reset_peak_memory_stats(self.device)
        self.phase = phase
        return ended, peak


class MetricsLog:
    """metrics.jsonl in the run folder, plus wandb when enabled."""

    def __init__(self, run_dir: Path, config: TrainConfig) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.wandb_run = None
        if config.wandb.mode.value != "disabled":
            import wandb  # optional at run time: not installed on every GPU image

            self.wandb_run = wandb.init(
                project=config.wandb.project,
                name=run_dir.name,
                dir=str(run_dir),
                mode=config.wandb.mode.value,
                config=OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True),
            )

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:  # lists (event records) stay in the file
            self.wandb_run.log({k: v for k, v in record.items() if not isinstance(v, list)}, step=record.get("step"))

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class Trainer:
    """Drives a run. Placement `inline` alternates generation and training in this process; `ray` runs the
    controller, queue shards, learner ranks and rollout workers as Ray actors, which generate while the
    learner trains. Both use the same controller, worker, queue and learner code; the learner is a
    PPOLearner in this process or the FSDP learner ranks behind a RayLearnerGroup, with the same methods."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        validate(config)
        warning = inert_clip_warning(config)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        torch.manual_seed(config.seed)
        run_name = config.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(config.output_dir) / run_name
        if not config.resume and (self.run_dir / "config.yaml").exists():  # every run writes it first
            raise InputError(f"{self.run_dir} already holds a run: choose another run_name, or set resume=true to "
                             "continue it")
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._build()
        except BaseException:
            if created:  # a start that fails leaves no folder behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _build(self) -> None:
        """Everything a run holds: the data, the engine, the learner, the queue and (Ray) the actors; resumes
        from the run checkpoint with resume=true."""
        config = self.config
        self.model_path = resolve_model_path(config)
        self.tokenizer = load_tokenizer(self.model_path)
        dtype = getattr(torch, config.model.dtype)
        self.train_records, self.heldout_records = load_train_and_heldout(config.data)
        engine_settings = config.engine
        self.memory_plan = None
        if torch.device(config.device).type == "cuda" and config.cluster.placement is Placement.inline:
            longest_prompt = max(len(encode_prompt(self.tokenizer, r.prompt))
                                 for r in self.train_records + self.heldout_records)
            # what is free now: another process, or an earlier run in this one, may hold part of the GPU
            gc.collect()
            torch.cuda.empty_cache()
            total, _ = torch.cuda.mem_get_info(torch.device(config.device))
            self.memory_plan = plan = inline_gpu_plan(config, load_config(self.model_path), total, longest_prompt)
            print(f"memory plan of one GPU (engine and learner in one process, taking turns):\n{plan.describe()}")
            write_text_atomically(self.run_dir / "memory_plan.txt", plan.describe() + "\n")
            if plan.micro_batch_tokens != config.ppo.micro_batch_tokens:
                print(f"ppo.micro_batch_tokens lowered from {config.ppo.micro_batch_tokens:,} to "
                      f"{plan.micro_batch_tokens:,}: the training phase fits this GPU with it (the gradient is the same)")
                config.ppo.micro_batch_tokens = plan.micro_batch_tokens
            engine_settings = dataclasses.replace(config.engine, kv_memory_gib=plan.kv_cache / GIB)
            # before the first allocation: the phases hand memory to each other, and a page of an expandable segment
            # goes back when freed whatever its neighbours hold (a fixed segment with one live block stays reserved:
            # 5.4 GiB of them kept the KV pool from being allocated again on an H100)
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        OmegaConf.save(OmegaConf.structured(config), self.run_dir / "config.yaml")

        rollout = config.rollout
        self.error_log = self.run_dir / "generation_errors.jsonl"
        self.errors_logged = 0
        controller = RolloutController(
            self.train_records,
            functools.partial(encode_prompt, self.tokenizer),
            group_size=config.generation.group_size,
            groups_per_step=rollout.groups_per_step,
            max_staleness=rollout.max_staleness,
            seed=config.seed,
            success_rate_range=None if config.data.success_rate_range is None else tuple(config.data.success_rate_range),
            max_oversample=rollout.max_oversample,
        )
        log_dir = str(self.run_dir / "trajectories") if rollout.log_trajectories else None
        self.verifier = build_verifier(config.reward)
        # the driver's engine: the rollout engine when inline, the evaluation engine in both placements
        engine = build_engine("torch", self.model_path, dtype, config.device, pad_token_id=self.tokenizer.pad_token_id,
                              settings=engine_settings)
        self.shared_memory = (SharedGpuMemory(engine, torch.device(config.device)) if self.memory_plan is not None
                              else None)
        self.worker = build_rollout_worker(config, engine, self.tokenizer, self.verifier)
        self.engine_weights = EngineWeights(engine, self.model_path, dtype)  # what publication writes, in place
        self.ray_cluster = None
        # the parts, in process or behind Ray, as the run sees them (areal_async/contracts.py)
        self.learner: Learner
        self.controller: Controller
        self.queue: ReplayQueue
        if config.cluster.placement is Placement.ray:
            self.ray_cluster = RayCluster(config, self.model_path, controller, log_dir, MAX_GENERATION_ATTEMPTS,
                                          MAX_REPEATED_ERRORS)
            self.controller, self.queue = self.ray_cluster.controller, self.ray_cluster.queue
            self.learner = self.ray_cluster.learner
        else:
            # fp32 master weights (what AdamW updates), compute under autocast in model.dtype, published in it
            self.learner = FSDPLearner(
                load_pretrained(self.model_path, torch.float32),
                config.ppo,
                pad_token_id=self.tokenizer.pad_token_id,
                temperature=config.generation.temperature,
                device=config.device,
                compile_layers=compiles_layers(config.ppo, config.device),
                compute_dtype=dtype,
                publish_dtype=dtype,
                learner_config=config.learner,
            )
            self.controller = ControllerService(controller, MAX_GENERATION_ATTEMPTS, MAX_REPEATED_ERRORS)
            self.queue = ShardedReplayQueue(rollout.num_queue_shards, rollout.queue_capacity_per_shard,
                                            rollout.max_staleness, log_dir,
                                            filter_zero_variance=config.ppo.filter_zero_variance_groups)
            transport = InProcessTransport()
            self.publisher = WeightPublisher(self.learner.policy_state(), transport)
            self.receiver = WeightReceiver(self.engine_weights.tensors, transport)
        self.benchmarks = []  # read now: a bad benchmark file fails before training starts
        if config.eval.benchmarks:
            self.benchmarks = load_benchmarks(config.eval.benchmarks, config.eval.data_dir)
            other = [b.name for b in self.benchmarks if b.spec.task != config.reward.kind.value]
            if other:
                raise InputError(f"eval.benchmarks {other} need another verifier than reward.kind="
                                 f"{config.reward.kind.value}: evaluate them with areal-async eval")
        self.start_step = 0
        self.accuracy_before: float | None = None
        self.dropped_before = 0
        if config.resume:
            self.restore()
        if self.ray_cluster is not None:
            self.ray_cluster.start()
        else:
            self.publish_inline(self.learner.version)
        self.enter_memory_phase("generation")  # the first step's peaks count from here, not from loading
        self.metrics = MetricsLog(self.run_dir, config)

    def enter_memory_phase(self, phase: str) -> dict[str, float]:
        """One GPU, inline: `phase` takes its turn with the memory (SharedGpuMemory); the phase that ended gives
        its peak as metric peak_gib_<phase>. Nothing elsewhere."""
        if self.shared_memory is None:
            return {}
        ended, peak = self.shared_memory.enter(phase)
        return {f"peak_gib_{ended}": peak}

    def publish_inline(self, version: int) -> None:
        self.publisher.publish(self.learner.policy_state(), version)
        self.engine_weights.applied(self.receiver.sync())

    def sync_driver_engine(self) -> None:
        """Ray placement: the driver's engine (evaluation, export) takes the learner's current weights."""
        if self.worker.engine.version != self.learner.version:
            self.worker.engine.load_weights(self.learner.policy_state(), self.learner.version)

    def heldout_accuracy(self, seed: int) -> float | None:
        """Averaged pass@1 on the held-out prompts: mean correctness of eval.num_samples samples each (None
        without held-out prompts or samples)."""
        config = self.config
        if not self.heldout_records or config.eval.num_samples < 1:
            return None
        self.sync_driver_engine()
        groups = [
            PromptGroup(f"heldout{i}", r.query_id, r.prompt, encode_prompt(self.tokenizer, r.prompt), r.solutions,
                        config.eval.num_samples, self.learner.version)
            for i, r in enumerate(self.heldout_records)
        ]
        correct = total = 0
        for start in range(0, len(groups), EVAL_GROUPS_PER_CALL):
            trajectories = self.worker.rollout(
                groups[start : start + EVAL_GROUPS_PER_CALL], config.generation,
                seed=seed + start, temperature=config.eval.temperature,
            )
            correct += sum(t.reward == config.reward.correct_reward for t in trajectories)
            total += len(trajectories)
        return correct / total

    def benchmark_accuracy(self, step: int) -> dict[str, float]:
        """The configured benchmarks' averaged pass@1 (and its standard error) with the current policy."""
        config = self.config
        self.sync_driver_engine()
        settings = EvalSettings(
            num_samples=config.eval.num_samples, temperature=config.eval.temperature, top_p=config.generation.top_p,
            top_k=config.generation.top_k, max_gen_tokens=config.eval.max_gen_tokens or config.generation.max_new_tokens,
            prompt_type=config.eval.prompt_type.value, seed=config.seed + step,
        )
        summaries = evaluate(self.worker.engine, self.tokenizer, {config.reward.kind.value: self.verifier},
                             self.benchmarks, settings,
                             out_dir=self.run_dir / "eval" / f"step{step + 1}",
                             identity={"run": str(self.run_dir), "version": self.learner.version})
        record = {}
        for name, summary in summaries.items():
            record[f"eval/{name}/pass@1"] = summary["pass@1"]
            record[f"eval/{name}/pass@1_stderr"] = summary["pass@1_stderr"]
        return record

    def gather_batch(self, step: int) -> list[list[Trajectory]]:
        """groups_per_step groups that training step `step` may use (stale ones are dropped by the queue)."""
        needed = self.config.rollout.groups_per_step
        batch: list[list[Trajectory]] = []
        rounds_without_progress = 0
        while len(batch) < needed:
            groups, stale = self.queue.take(needed - len(batch), training_step=step)
            self.controller.free_slots(stale)
            batch.extend(groups)
            if len(batch) >= needed:
                break
            if self.ray_cluster is not None:
                self.ray_cluster.check_actors()
                self.check_generation_errors(step)
                time.sleep(RAY_POLL_S)
                continue
            counts = self.controller.counts()
            # more groups when most are dropped on arrival, as many as the queue has room for should all be kept
            per_request = self.config.rollout.groups_per_request
            request = max(per_request, min(math.ceil(per_request * counts["oversample"]), self.queue.room()))
            produced = self.worker.produce(
                self.controller, self.queue, self.config.generation, request,
                seed=self.config.seed * 100_003 + counts["produced"], wait_when_full=False,
            )
            self.check_generation_errors(step)
            rounds_without_progress = 0 if groups or produced["groups"] else rounds_without_progress + 1
            if rounds_without_progress > MAX_IDLE_ROUNDS:
                raise RuntimeError(f"step {step}: no trainable group arrived after {MAX_IDLE_ROUNDS} rounds "
                                   f"(ledger {self.ledger().totals()}; generation errors in {self.error_log})")
        return batch

    def log_generation_errors(self) -> None:
        """Appends the generation errors not yet written (with their tracebacks) to generation_errors.jsonl."""
        errors = self.controller.errors_since(self.errors_logged)
        if not errors:
            return
        with open(self.error_log, "a", encoding="utf-8") as f:
            for error in errors:
                f.write(json.dumps(error) + "\n")
        self.errors_logged = errors[-1]["index"] + 1

    def check_generation_errors(self, step: int) -> None:
        """Writes new generation errors to the run folder; stops the run when one keeps repeating."""
        self.log_generation_errors()
        fatal = self.controller.fatal_error()
        if fatal is not None:
            raise GenerationFailed(
                f"step {step}: generation failed {fatal['repeated']} times in a row with the same error "
                f"(every error is in {self.error_log}):\n{fatal['traceback'] or fatal['reason']}"
            )

    def ledger(self) -> Ledger:
        """Exact at quiet points (inline, or after the workers stopped); during a Ray run a group can be
        between its worker's put and delivery receipt."""
        counts = self.controller.counts()
        return Ledger.combine(counts["produced"], counts["in_flight"], self.queue.shard_counts(),
                              Counter(counts["controller_dropped"]))

    def step(self, step: int) -> dict:
        config = self.config
        started = time.perf_counter()
        before = self.controller.counts()
        batch = self.gather_batch(step)
        peaks = self.enter_memory_phase("training")
        gathered = time.perf_counter()
        trajectories = [t for group in batch for t in group]
        scored = [t for t in trajectories if not math.isnan(t.reward)]  # NaN: the verifier could not judge it
        if not scored:
            raise RunStopped(f"step {step}: the verifier could judge none of its {len(trajectories)} answers "
                             "(metrics.jsonl's reward_failures_by_reason says why)")
        # one advantage stage for both placements: over the whole batch, before any split across ranks
        stats = self.learner.train_step(scored, trajectory_advantages(scored, config.ppo.advantage_norm.value))
        peaks |= self.enter_memory_phase("publication")
        trained = time.perf_counter()
        if self.ray_cluster is not None:
            self.ray_cluster.publish(self.learner.version)
        else:
            self.publish_inline(self.learner.version)
            self.controller.set_version(self.learner.version)
        peaks |= self.enter_memory_phase("generation")  # the evaluations after this step and the next rollout
        published = time.perf_counter()

        staleness = [step - t.oldest_version for t in trajectories]
        after = self.controller.counts()
        generated_tokens = after["generated_tokens"] - before["generated_tokens"]
        generate_s = after["generation_seconds"] - before["generation_seconds"]
        reward_s = after["reward_seconds"] - before["reward_seconds"]
        scored_generated = after["generated_scored"] - before["generated_scored"]
        produced = after["produced"] - before["produced"]
        reward_failures = Counter(after["reward_failures"])
        reward_failures.subtract(before["reward_failures"])
        episodes = Counter(after["episode_counts"])
        episodes.subtract(before["episode_counts"])
        step_s = published - started
        ledger = self.ledger()
        dropped = sum(ledger.dropped.values())
        record = {
            "step": step,
            "version": self.learner.version,
            "reward_mean": sum(t.reward for t in scored) / len(scored),  # the trained batch, after the queue's filter
            # every answer generated during the step, filtered or not (None: none was scored in it)
            "reward_mean_generated": ((after["generated_reward_sum"] - before["generated_reward_sum"])
                                      / scored_generated if scored_generated else None),
            "accuracy": sum(t.reward == config.reward.correct_reward for t in scored) / len(scored),
            "reward_unscored": len(trajectories) - len(scored),  # left out of the loss
            "response_length_mean": sum(len(t.output_tokens) for t in trajectories) / len(trajectories),
            "staleness_max": max(staleness),
            "staleness_mean": sum(staleness) / len(staleness),
            "queue_depth": self.queue.depth,
            "groups_dropped": dropped - self.dropped_before,
            "groups_dropped_fraction": (dropped - self.dropped_before) / produced if produced else None,
            "prompts_skipped": after["prompts_skipped"] - before["prompts_skipped"],  # data.success_rate_range
            "tokens_per_s": generated_tokens / step_s,  # generated tokens per second of wall time
            "trained_tokens_per_s": stats["trained_tokens"] / step_s,
            "generation_tokens_per_s": generated_tokens / max(generate_s, 1e-9),  # per worker
            "training_tokens_per_s": stats["trained_tokens"] / (trained - gathered),
            "reward_failures": sum(reward_failures.values()),
            "reward_failures_by_reason": {reason: n for reason, n in reward_failures.items() if n},
            # the step's episodes: how they ended (ended_done, ended_turns, ...), turns, tool calls (by tool and
            # outcome), malformed calls, the model's and the environment's tokens
            "episodes": {name: n for name, n in sorted(episodes.items()) if n},
            **agent_rates(episodes),
            "gather_s": gathered - started,
            "train_s": trained - gathered,
            "weight_sync_seconds": published - trained,
            "step_s": step_s,
            # inline, the step's phases; under Ray generation and reward overlap the rest (per-worker sums)
            "generation_s": generate_s,
            "reward_s": reward_s,
            **stats,
            **peaks,
        }
        if self.ray_cluster is None:
            timings = self.learner.last_step_timings
            record.update(timings)
            record["other_s"] = step_s - generate_s - reward_s - sum(timings.values()) - record["weight_sync_seconds"]
        else:  # what happened to the workers during this step (each replacement, also printed when it happened)
            record["worker_restarts"] = self.ray_cluster.restarts
            record["worker_events"], self.ray_cluster.events = self.ray_cluster.events, []
        self.dropped_before = dropped
        return record

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "state"

    def save_run_state(self, next_step: int) -> Path:
        """A resumable checkpoint taken between steps. Rollout workers may be generating (Ray placement):
        the controller is snapshot first, with admission held until the queue's snapshot is taken, and
        groups that reached the queue in between count as delivered (`settle_deliveries`). Groups still in
        flight are generated again after a resume."""
        service_state = self.controller.hold_and_snapshot()
        try:
            in_flight = [group["group_id"] for group in service_state["controller"]["in_flight"]]
            queue_state = self.queue.snapshot(in_flight)
        finally:
            self.controller.release()
        receipts = {group_id: outcome for shard in queue_state for group_id, outcome in shard.pop("receipts").items()}
        service_state["controller"] = settle_deliveries(service_state["controller"], receipts)
        trainer_state = {
            "step": next_step,
            "version": self.learner.version,
            "accuracy_before": self.accuracy_before,
            "dropped_before": self.dropped_before,
            "controller": service_state,
            "queue": queue_state,
            "rng": rng_state(),
        }
        staging = stage_checkpoint(self.state_dir, next_step)
        self.learner.save_state(staging)
        return commit_checkpoint(self.state_dir, next_step, staging, trainer_state, keep=self.config.keep_checkpoints)

    def restore(self) -> None:
        """Continues from the latest run checkpoint: weights, optimizer, version, data order, queue, ledger."""
        path = latest_run_checkpoint(self.state_dir)
        if path is None:
            raise InputError(f"resume=true: no run checkpoint under {self.state_dir}")
        state = read_trainer_state(path)
        self.learner.load_state(path)  # Ray placement: the learner ranks load it when they start
        self.start_step, self.learner.version = state["step"], state["version"]
        self.accuracy_before, self.dropped_before = state["accuracy_before"], state["dropped_before"]
        self.controller.load_state_dict(state["controller"])
        self.queue.load_state_dict(state["queue"], resume_step=self.start_step)
        restore_rng_state(state["rng"])
        keep_metrics_before(self.run_dir / "metrics.jsonl", self.start_step)
        print(f"resumed {self.run_dir} at step {self.start_step} (version {self.learner.version}) from {path}")

    def save_checkpoint(self, name: str) -> Path:
        """A Hugging Face checkpoint folder of the current policy (written from the driver's engine copy)."""
        self.sync_driver_engine()
        return save_weights_pretrained(self.engine_weights.tensors, load_config(self.model_path),
                                       self.run_dir / "checkpoints" / name, tokenizer_dir=self.model_path)

    def run(self, show_progress: bool = True) -> dict:
        config = self.config
        started = time.perf_counter()
        broken = False  # an actor died: the others are killed, nothing is stopped in order
        try:
            if self.accuracy_before is None:
                self.accuracy_before = self.heldout_accuracy(seed=config.seed)
                if self.accuracy_before is not None:
                    print(f"held-out accuracy before RL: {self.accuracy_before:.3f} ({len(self.heldout_records)} "
                          f"problems x {config.eval.num_samples} samples, T={config.eval.temperature})")
            accuracy_before = self.accuracy_before
            progress = tqdm(range(self.start_step, config.total_steps), desc="train", disable=not show_progress,
                            initial=self.start_step, total=config.total_steps)
            for step in progress:
                record = self.step(step)
                if config.eval.every_steps and (step + 1) % config.eval.every_steps == 0:
                    record["heldout_accuracy"] = self.heldout_accuracy(seed=config.seed + 7 * step)
                every = config.eval.benchmark_every_steps
                if config.eval.benchmarks and every and (step + 1) % every == 0:
                    record.update(self.benchmark_accuracy(step))
                self.metrics.write(record)
                progress.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}")
                if config.save_every and (step + 1) % config.save_every == 0:
                    self.save_checkpoint(f"step{step + 1}")
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                    self.save_run_state(step + 1)
            accuracy_after = self.heldout_accuracy(seed=config.seed)
            final = self.save_checkpoint("final")
            learner_checksum = state_checksum(self.learner.policy_state())  # before the learner ranks stop
        except (ActorDied, WorkerKeepsDying) as error:
            broken = True
            checkpoint = latest_run_checkpoint(self.state_dir)
            resume = (f"its last run checkpoint is {checkpoint}: continue with resume=true" if checkpoint else
                      "it wrote no run checkpoint (checkpoint_every) to resume from")
            raise RunStopped(f"the run stopped: {error}; {resume}") from error
        finally:
            if broken:
                self.ray_cluster.abort()
            else:
                self.log_generation_errors()
                worker_results = self.ray_cluster.stop() if self.ray_cluster is not None else []
                self.controller.stop()
                self.queue.drain("shutdown")  # generated ahead but never trained on
                self.queue.close()
            self.metrics.close()
            self.verifier.close()
            self.worker.close()
        ledger = self.ledger()
        rollout_checksums = [r["weights_checksum"] for r in worker_results] or [
            state_checksum(self.engine_weights.tensors)  # inline: the driver's engine
        ]
        summary = {
            "accuracy_before": accuracy_before,
            "accuracy_after": accuracy_after,
            "wall_seconds": time.perf_counter() - started,
            "version": self.learner.version,
            "steps": config.total_steps,
            "final_checkpoint": str(final),
            **ledger.totals(),
            "ledger_balanced": ledger.balanced,
            "readmitted": self.controller.counts()["readmitted"],
            "generation_errors": self.controller.counts()["generation_errors"],
            "reward_failures": self.controller.counts()["reward_failures"],
            "workers": worker_results,
            "worker_restarts": self.ray_cluster.restarts if self.ray_cluster is not None else 0,
            "rollout_weights_identical": all(checksum == learner_checksum for checksum in rollout_checksums),
            # one GPU, inline: each phase's planned peak of allocated memory (beside metrics.jsonl's measured ones)
            # and the reserve, which covers what torch allocates beyond the plan's parts (cuBLAS workspaces)
            "memory_plan_gib": None if self.memory_plan is None else {
                "phases": {phase: (value - self.memory_plan.reserve) / GIB
                           for phase, value in self.memory_plan.phases.items()},
                "reserve": self.memory_plan.reserve / GIB},
        }
        write_json_atomically(self.run_dir / "summary.json", summary)
        plot_training_curves(self.run_dir)
        accuracy = ("no held-out evaluation" if accuracy_after is None else
                    f"held-out accuracy: before {accuracy_before:.3f} -> after {accuracy_after:.3f}")
        print(f"{accuracy} ({summary['wall_seconds']:.0f} s, version {self.learner.version}); run folder {self.run_dir}")
        return summary


def keep_metrics_before(path: Path, step: int) -> None:
    """Drops the metrics lines of steps >= `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def run_training(config: TrainConfig, show_progress: bool = True) -> dict:
    return Trainer(config).run(show_progress)


def agent_rates(episodes: Counter) -> dict:
    """Per-episode rates of a step's episode counts (none for a step without episodes)."""
    count = episodes["episodes"]
    if not count:
        return {}
    tokens = episodes["model_tokens"] + episodes["environment_tokens"]
    return {"tool_call_rate": episodes["episodes_with_tool_calls"] / count,
            "turns_per_episode": episodes["turns"] / count,
            "malformed_tool_calls_per_episode": episodes["malformed_tool_calls"] / count,
            "environment_token_fraction": episodes["environment_tokens"] / tokens if tokens else 0.0}
