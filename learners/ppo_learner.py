"""The learner: recomputes proximal logprobs, builds advantages and takes decoupled-PPO steps."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from areal_async.config import Objective, PPOConfig
from areal_async.model import CausalLM, sequence_logprobs
from areal_async.objective import decoupled_ppo_loss, group_advantages, kl_penalty
from areal_async.packing import PaddedBatch, pad_prompt_output_batch, split_by_token_budget
from areal_async.types import Trajectory


def trajectory_advantages(trajectories: Sequence[Trajectory], normalise_std: bool) -> list[float]:
    """One advantage per trajectory from group-normalised rewards (groups keyed by group_id, any order)."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for index, trajectory in enumerate(trajectories):
        by_group[trajectory.group_id].append(index)
    advantages = [0.0] * len(trajectories)
    for indices in by_group.values():
        rewards = torch.tensor([[trajectories[i].reward for i in indices]], dtype=torch.float64)
        for i, value in zip(indices, group_advantages(rewards, normalise_std)[0].tolist()):
            advantages[i] = value
    return advantages


class PPOLearner:
    """Owns the trained policy and its optimizer; `version` counts the updates published so far."""

    def __init__(
        self,
        model: CausalLM,
        config: PPOConfig,
        pad_token_id: int,
        temperature: float,
        device: str | torch.device = "cpu",
        version: int = 0,
    ) -> None:
        self.model = model.to(device).train()
        self.config = config
        self.pad_token_id = pad_token_id
        self.temperature = temperature if temperature > 0 else 1.0
        self.device = torch.device(device)
        self.version = version
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        self.reference = None
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The weights to publish to the actors (named as the model's parameters)."""
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def _pad(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> PaddedBatch:
        return pad_prompt_output_batch(
            [t.prompt_tokens for t in trajectories],
            [t.output_tokens for t in trajectories],
            self.pad_token_id,
            per_token={
                "behaviour_logprobs": [t.behaviour_logprobs for t in trajectories],
                "advantages": [np.full(len(t.output_tokens), a, dtype=np.float32) for t, a in zip(trajectories, advantages)],
            },
        )

    @torch.no_grad()
    def _logprobs(self, model: CausalLM, batch: PaddedBatch) -> torch.Tensor:
        return sequence_logprobs(model, batch.input_ids.to(self.device), batch.valid.to(self.device), self.temperature)

    def prepare(self, trajectories: Sequence[Trajectory]) -> list[PaddedBatch]:
        """Micro-batches under the token budget with advantages, and proximal (and reference) logprobs
        recomputed with the current weights before any update."""
        advantages = trajectory_advantages(trajectories, self.config.normalise_advantage_std)
        lengths = [t.num_tokens for t in trajectories]
        micro_batches = [
            self._pad([trajectories[i] for i in indices], [advantages[i] for i in indices])
            for indices in split_by_token_budget(lengths, self.config.micro_batch_tokens)
        ]
        self.model.eval()
        for batch in micro_batches:
            if self.config.objective is Objective.decoupled:
                batch.values["proximal_logprobs"] = self._logprobs(self.model, batch)
            else:
                batch.values["proximal_logprobs"] = batch.values["behaviour_logprobs"]
            if self.reference is not None:
                batch.values["reference_logprobs"] = self._logprobs(self.reference, batch)
        self.model.train()
        return micro_batches

    def backward(self, micro_batches: Sequence[PaddedBatch]) -> dict[str, float]:
        """Accumulates the gradient of the token-mean loss over all `micro_batches` (each micro-batch's
        loss is weighted by its share of the tokens, so the gradient does not depend on the budget)."""
        config = self.config
        total_tokens = sum(b.num_output_tokens for b in micro_batches)
        stats: dict[str, float] = defaultdict(float)
        for batch in micro_batches:
            share = batch.num_output_tokens / max(1, total_tokens)
            mask = batch.output_mask.to(self.device)
            logprobs = sequence_logprobs(
                self.model, batch.input_ids.to(self.device), batch.valid.to(self.device), self.temperature
            )
            loss, loss_stats = decoupled_ppo_loss(
                logprobs,
                batch.values["proximal_logprobs"].to(self.device),
                batch.values["behaviour_logprobs"].to(self.device),
                batch.values["advantages"].to(self.device),
                mask,
                eps_clip=config.eps_clip,
                behaviour_weight_cap=config.behaviour_weight_cap,
                behaviour_weight_mode=config.behaviour_weight_mode.value,
            )
            if self.reference is not None:
                kl = kl_penalty(logprobs, batch.values["reference_logprobs"].to(self.device), mask)
                loss = loss + config.kl_coef * kl
                stats["kl_reference"] += kl.item() * share
            (loss * share).backward()
            stats["loss"] += loss.item() * share
            for name, value in loss_stats.items():
                if name == "behaviour_weight_max":
                    stats[name] = max(stats.get(name, 0.0), float(value))
                else:
                    stats[name] += float(value) * share
        return dict(stats)

    def train_step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """One training step over whole groups (minibatches_per_step optimizer updates): produces version + 1."""
        micro_batches = self.prepare(trajectories)
        parts = np.array_split(np.arange(len(micro_batches)), max(1, min(self.config.minibatches_per_step, len(micro_batches))))
        stats: dict[str, float] = defaultdict(float)
        for part in parts:
            self.optimizer.zero_grad(set_to_none=True)
            for name, value in self.backward([micro_batches[i] for i in part]).items():
                stats[name] = max(stats[name], value) if name == "behaviour_weight_max" else stats[name] + value / len(parts)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            stats["grad_norm"] += float(grad_norm) / len(parts)
            self.optimizer.step()
        self.version += 1
        stats["trained_tokens"] = float(sum(int(b.valid.sum()) for b in micro_batches))  # prompt + output
        return dict(stats)
