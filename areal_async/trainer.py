"""The training run: controller -> rollout -> learner -> weight publication, with metrics and checkpoints.

The loop is written for the asynchronous system's invariants (admission by the staleness rule, per-token
versions, a conservation ledger); with max_staleness = 0 it is synchronous RL.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer

from areal_async.config import SFTConfig, TrainConfig
from areal_async.controller import RolloutController
from areal_async.data import load_train_and_heldout
from areal_async.ledger import Ledger
from areal_async.model import load_pretrained, save_pretrained
from areal_async.reward import RewardVerifier
from areal_async.sft import BUNDLED_WARMSTART, run_sft
from areal_async.types import PromptGroup, Trajectory

EVAL_GROUPS_PER_CALL = 64


def resolve_model_path(config: TrainConfig) -> Path:
    """The configured checkpoint, or the bundled warm start (recreated by the SFT script if it is missing)."""
    if config.model.path:
        path = Path(config.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={path}: not a Hugging Face checkpoint folder (no config.json)")
        return path
    if not (BUNDLED_WARMSTART / "config.json").is_file():
        print(f"warm start missing at {BUNDLED_WARMSTART}; running the SFT script to recreate it")
        run_sft(SFTConfig())
    return BUNDLED_WARMSTART


def is_zero_variance(group: list[Trajectory]) -> bool:
    """All samples of the group got the same reward: its advantages are all zero, nothing to learn."""
    return len({t.reward for t in group}) == 1


def split_groups(trajectories: list[Trajectory]) -> dict[str, list[Trajectory]]:
    groups: dict[str, list[Trajectory]] = {}
    for trajectory in trajectories:
        groups.setdefault(trajectory.group_id, []).append(trajectory)
    return groups


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
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record.get("step"))

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        from actors.engine import TorchEngine  # actors and learners meet only here, through areal_async types
        from actors.rollout import RolloutWorker
        from learners.ppo_learner import PPOLearner

        if config.reward.correct_reward <= config.reward.incorrect_reward:
            raise ValueError("reward.correct_reward must be greater than reward.incorrect_reward")
        torch.manual_seed(config.seed)
        run_name = config.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(config.output_dir) / run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(config), self.run_dir / "config.yaml")

        self.model_path = resolve_model_path(config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, config.model.dtype)
        self.train_records, self.heldout_records = load_train_and_heldout(config.data)

        self.ledger = Ledger()
        self.controller = RolloutController(
            self.train_records,
            self.tokenizer.encode,
            group_size=config.generation.group_size,
            groups_per_step=config.rollout.groups_per_step,
            max_staleness=config.rollout.max_staleness,
            seed=config.seed,
            ledger=self.ledger,
        )
        self.verifier = RewardVerifier(
            num_workers=config.reward.num_workers,
            timeout_s=config.reward.timeout_s,
            memory_limit_mb=config.reward.memory_limit_mb,
            correct_reward=config.reward.correct_reward,
            incorrect_reward=config.reward.incorrect_reward,
            extract_mode=config.reward.extract_mode,
        )
        engine = TorchEngine(load_pretrained(self.model_path, dtype), self.tokenizer.pad_token_id, config.device)
        decode = lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
        self.worker = RolloutWorker(engine, decode, self.verifier, [self.tokenizer.eos_token_id])
        self.learner = PPOLearner(
            load_pretrained(self.model_path, dtype),
            config.ppo,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=config.generation.temperature,
            device=config.device,
        )
        self.metrics = MetricsLog(self.run_dir, config)

    def heldout_accuracy(self, seed: int) -> float:
        """Averaged pass@1 on the held-out prompts: mean correctness of eval.num_samples samples each."""
        config = self.config
        groups = [
            PromptGroup(f"heldout{i}", r.query_id, r.prompt, self.tokenizer.encode(r.prompt), r.solutions,
                        config.eval.num_samples, self.learner.version)
            for i, r in enumerate(self.heldout_records)
        ]
        correct = total = 0
        for start in range(0, len(groups), EVAL_GROUPS_PER_CALL):
            trajectories = self.worker.rollout(
                groups[start : start + EVAL_GROUPS_PER_CALL],
                max_new_tokens=config.generation.max_new_tokens,
                temperature=config.eval.temperature,
                seed=seed + start,
            )
            correct += sum(t.reward == config.reward.correct_reward for t in trajectories)
            total += len(trajectories)
        return correct / total

    def step(self, step: int) -> dict:
        config = self.config
        started = time.perf_counter()
        groups = self.controller.admit_all(self.learner.version)
        trajectories = self.worker.rollout(
            groups,
            max_new_tokens=config.generation.max_new_tokens,
            temperature=config.generation.temperature,
            top_p=config.generation.top_p,
            top_k=config.generation.top_k,
            seed=config.seed * 100_003 + step,
        )
        self.ledger.finish_generation(len(groups))
        generated = time.perf_counter()

        trainable: list[Trajectory] = []
        for group in split_groups(trajectories).values():
            if config.ppo.filter_zero_variance_groups and is_zero_variance(group):
                self.ledger.drop("zero_variance")
            else:
                self.ledger.consume()
                trainable.extend(group)
        stats = self.learner.train_step(trainable) if trainable else {"trained_tokens": 0.0}
        if not trainable:
            self.learner.version += 1  # an empty step still closes the version, so versions stay step-aligned
        trained = time.perf_counter()
        self.worker.engine.load_weights(self.learner.policy_state(), self.learner.version)
        published = time.perf_counter()

        output_tokens = sum(len(t.output_tokens) for t in trajectories)
        staleness = [self.learner.version - 1 - t.oldest_version for t in trainable]
        return {
            "step": step,
            "version": self.learner.version,
            "reward_mean": sum(t.reward for t in trajectories) / len(trajectories),
            "accuracy": sum(t.reward == config.reward.correct_reward for t in trajectories) / len(trajectories),
            "response_length_mean": output_tokens / len(trajectories),
            "groups_trained": len(split_groups(trainable)),
            "staleness_max": max(staleness, default=0),
            "tokens_per_s": output_tokens / (published - started),  # generated tokens per second of wall time
            "generation_tokens_per_s": output_tokens / (generated - started),
            "training_tokens_per_s": stats["trained_tokens"] / max(trained - generated, 1e-9),
            "generate_s": generated - started,
            "train_s": trained - generated,
            "weight_sync_s": published - trained,
            "step_s": published - started,
            **{k: v for k, v in stats.items() if k != "trained_tokens"},
            "trained_tokens": stats["trained_tokens"],
        }

    def save_checkpoint(self, name: str) -> Path:
        return save_pretrained(self.learner.model, self.run_dir / "checkpoints" / name, tokenizer_dir=self.model_path)

    def run(self, show_progress: bool = True) -> dict:
        config = self.config
        started = time.perf_counter()
        try:
            accuracy_before = self.heldout_accuracy(seed=config.seed)
            print(f"held-out accuracy before RL: {accuracy_before:.3f} ({len(self.heldout_records)} problems "
                  f"x {config.eval.num_samples} samples, T={config.eval.temperature})")
            progress = tqdm(range(config.total_steps), desc="train", disable=not show_progress)
            for step in progress:
                record = self.step(step)
                if config.eval.every_steps and (step + 1) % config.eval.every_steps == 0:
                    record["heldout_accuracy"] = self.heldout_accuracy(seed=config.seed + 7 * step)
                self.metrics.write(record)
                progress.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}")
                if config.save_every and (step + 1) % config.save_every == 0:
                    self.save_checkpoint(f"step{step + 1}")
            accuracy_after = self.heldout_accuracy(seed=config.seed)
            final = self.save_checkpoint("final")
        finally:
            self.metrics.close()
            self.verifier.close()
        summary = {
            "accuracy_before": accuracy_before,
            "accuracy_after": accuracy_after,
            "wall_seconds": time.perf_counter() - started,
            "version": self.learner.version,
            "steps": config.total_steps,
            "final_checkpoint": str(final),
            "ledger": self.ledger.totals(),
            "ledger_balanced": self.ledger.balanced,
        }
        with open(self.run_dir / "summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"held-out accuracy: before {accuracy_before:.3f} -> after {accuracy_after:.3f} "
              f"({summary['wall_seconds']:.0f} s, version {self.learner.version}); run folder {self.run_dir}")
        return summary


def run_training(config: TrainConfig, show_progress: bool = True) -> dict:
    return Trainer(config).run(show_progress)
