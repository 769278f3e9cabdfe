"""The learner: recomputes proximal logprobs, builds advantages and takes decoupled-PPO steps."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from areal_async.checkpointing import load_learner_state, save_learner_state
from areal_async.config import KLMode, LearnerConfig, Objective, PPOConfig
from areal_async.model import CausalLM, packed_sequence_logprobs
from areal_async.objective import decoupled_ppo_loss, kl_penalty, kl_reward_to_go, logprob_agreement
from areal_async.packing import PackedBatch, pack_prompt_output_batch, split_into_minibatches, split_into_packs
from areal_async.types import Trajectory


MAX_STAT = "behaviour_weight_max"  # the one stat that combines by max (over packs, updates and ranks), not by mean


def combine_update_stats(updates: Sequence[dict[str, float]]) -> dict[str, float]:
    """The stats of a step's optimizer updates as one: each stat's mean over the updates, MAX_STAT's max."""
    combined: dict[str, float] = {}
    for stats in updates:
        for name, value in stats.items():
            previous = combined.get(name, 0.0)
            combined[name] = max(previous, value) if name == MAX_STAT else previous + value / len(updates)
    return combined


def agreement_totals(micro_batches: Sequence[PackedBatch], version: int) -> dict[str, torch.Tensor]:
    """`logprob_agreement`'s sum, max and token count over every pack of a step (0-d fp64, on the packs'
    proximal logprobs' device)."""
    totals: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        values = batch.values
        device = values["proximal_logprobs"].device
        part = logprob_agreement(values["behaviour_logprobs"].to(device), values["proximal_logprobs"],
                                 values["versions"].to(device), batch.output_mask.to(device), version)
        for name, value in part.items():
            totals[name] = value if name not in totals else (
                torch.maximum(totals[name], value) if name == "max" else totals[name] + value)
    return totals


def agreement_stats(total: float, largest: float, tokens: float) -> dict[str, float]:
    """The step's metrics from agreement totals: its token count, and its mean and max when it has tokens."""
    stats = {"agreement_tokens": tokens}
    if tokens:
        stats.update(agreement_mean=total / tokens, agreement_max=largest)
    return stats


def read_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors (one device) -> Python floats, in one host read (exact: each value goes through fp64)."""
    if not stats:
        return {}
    names = list(stats)
    return dict(zip(names, torch.stack([stats[name].to(torch.float64) for name in names]).tolist()))


def build_optimizer(params, config: PPOConfig) -> torch.optim.AdamW:
    """AdamW with the config's hyperparameters (fused kernels on CUDA)."""
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(
        params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
        fused=fused or None,
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """Linear warm-up over `warmup_steps` optimizer updates, then the constant configured rate."""
    return LambdaLR(optimizer, functools.partial(warmup_factor, warmup_steps=warmup_steps))


class PPOLearner:
    """Owns the trained policy and its optimizer; `version` counts the updates published so far.

    learner_config: how it computes (packed attention kernel, kept logits; default LearnerConfig()). place:
    called with the learner once its model and frozen reference exist, still where `model` was given, and before
    the optimizer is built over the model's parameters; it puts them on `device` (FSDPLearner shards them on the
    way, so a rank never holds the full weights there). Without it the learner moves them itself."""

    def __init__(
        self,
        model: CausalLM,
        config: PPOConfig,
        pad_token_id: int,
        temperature: float,
        device: str | torch.device = "cpu",
        version: int = 0,
        learner_config: LearnerConfig | None = None,
        place: Callable[[PPOLearner], None] | None = None,
    ) -> None:
        self.model = (model if place is not None else model.to(device)).train()
        self.config = config
        self.learner_config = learner_config or LearnerConfig()
        self.pad_token_id = pad_token_id
        self.temperature = temperature if temperature > 0 else 1.0
        self.device = torch.device(device)
        self.version = version
        self.reference = None
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        # The dtype the forward passes autocast to (None: no autocast, the parameters' dtype). A plain
        # one-rank FSDPLearner on CUDA sets bf16 for its fp32 parameters.
        self.autocast_dtype: torch.dtype | None = None
        if place is not None:
            place(self)
        self.optimizer = build_optimizer(self.model.parameters(), config)
        self.scheduler = build_lr_scheduler(self.optimizer, config.lr_warmup_steps)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the policy's (and reference's) forward passes run in; backward runs outside it."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def save_state(self, staging: Path) -> None:
        """Policy, optimizer and learning-rate schedule into a run checkpoint's staging folder."""
        save_learner_state(staging, self)

    def load_state(self, path: Path) -> None:
        load_learner_state(path, self)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The weights to publish to the actors (named as the model's parameters)."""
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def _pack(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> PackedBatch:
        return pack_prompt_output_batch(
            [t.prompt_tokens for t in trajectories],
            [t.output_tokens for t in trajectories],
            per_token={
                "behaviour_logprobs": [t.behaviour_logprobs for t in trajectories],
                "versions": [t.versions for t in trajectories],
                "advantages": [np.full(len(t.output_tokens), a, dtype=np.float32) for t, a in zip(trajectories, advantages)],
            },
            loss_masks=[t.loss_mask for t in trajectories],
        )

    @torch.no_grad()
    def _logprobs(self, model: CausalLM, batch: PackedBatch) -> torch.Tensor:
        with self.autocast():
            return packed_sequence_logprobs(model, batch.to(self.device), self.temperature, self.learner_config)

    def prepare(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> list[PackedBatch]:
        """Packed micro-batches of at most `micro_batch_tokens` real tokens each (a longer sequence gets its
        own), with advantages (one per trajectory, computed over the whole step batch), and proximal (and
        reference) logprobs recomputed with the current weights before any update.
        """
        lengths = [t.num_tokens for t in trajectories]
        micro_batches = [
            self._pack([trajectories[i] for i in indices], [advantages[i] for i in indices])
            for indices in split_into_packs(lengths, self.config.micro_batch_tokens)
        ]
        self.model.eval()
        for batch in micro_batches:
            if self.config.objective is Objective.decoupled:
                batch.values["proximal_logprobs"] = self._logprobs(self.model, batch)
            else:
                batch.values["proximal_logprobs"] = batch.values["behaviour_logprobs"]
            if self.reference is not None:
                batch.values["reference_logprobs"] = self._logprobs(self.reference, batch)
                if self.config.kl_mode is KLMode.reward:  # on the logprobs' device: no copy back to the host
                    values, device = batch.values, batch.values["proximal_logprobs"].device
                    values["advantages"] = values["advantages"].to(device) + kl_reward_to_go(
                        values["proximal_logprobs"], values["reference_logprobs"], batch.output_mask.to(device),
                        batch.document_ids[0].to(device), self.config.kl_coef)
        self.model.train()
        return micro_batches

    def backward(
        self, micro_batches: Sequence[PackedBatch], loss_scale: float = 1.0, total_output_tokens: int | None = None,
        read: bool = True,
    ) -> dict[str, float]:
        """Accumulates `loss_scale` x the gradient of the token-mean loss over all `micro_batches`: each pack's
        token-mean loss is weighted by its share of the output tokens, so the gradient does not depend on how
        the sequences were packed.

        total_output_tokens: the token-mean's denominator (default: the output tokens of `micro_batches`).
        Data-parallel ranks pass the all-reduced global count; the sum of their gradients is then the
        one-rank gradient of the whole batch (a reduction that averages over M ranks needs loss_scale=M).
        The returned stats are weighted the same way, so with a global count they too sum over ranks
        (behaviour_weight_max: take the max); they do not include loss_scale. read=False returns them as 0-d
        fp64 tensors on the device instead (no host read: the caller reads them later, with `read_stats`).
        """
        config = self.config
        if total_output_tokens is None:
            total_output_tokens = sum(b.num_output_tokens for b in micro_batches)
        # Kept on the device (fp64, the same arithmetic as Python floats) and read once at the end: a read per
        # pack would stall the host until the pack's backward finished before it could queue the next pack.
        stats: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor, share: float) -> None:
            value = value.detach().to(self.device, torch.float64)
            if name == MAX_STAT:
                stats[name] = torch.maximum(stats[name], value) if name in stats else value.clamp(min=0.0)
            else:
                stats[name] = stats[name] + value * share if name in stats else value * share

        for pack in micro_batches:
            share = pack.num_output_tokens / max(1, total_output_tokens)
            batch = pack.to(self.device)
            mask = batch.output_mask
            with self.autocast():
                logprobs = packed_sequence_logprobs(self.model, batch, self.temperature, self.learner_config)
            loss, loss_stats = decoupled_ppo_loss(
                logprobs,
                batch.values["proximal_logprobs"],
                batch.values["behaviour_logprobs"],
                batch.values["advantages"],
                mask,
                eps_clip=config.eps_clip,
                behaviour_weight_cap=config.behaviour_weight_cap,
                behaviour_weight_mode=config.behaviour_weight_mode.value,
            )
            if self.reference is not None:
                kl = kl_penalty(logprobs, batch.values["reference_logprobs"], mask)
                if config.kl_mode is KLMode.loss:  # else it is in the advantages (prepare)
                    loss = loss + config.kl_coef * kl
                add("kl_reference", kl, share)
            (loss * (share * loss_scale)).backward()
            add("loss", loss, share)
            for name, value in loss_stats.items():
                add(name, value, share)
        return read_stats(stats) if read else stats

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> dict[str, float]:
        """One training step: produces version + 1. `advantages`: one per trajectory, computed over the whole
        step batch (areal_async.objective.trajectory_advantages). The shuffled trajectories are cut into
        minibatches_per_step minibatches (one optimizer update each, at most one per trajectory), and every
        minibatch's proximal logprobs are taken before the first update. With the decoupled objective the
        stats include the rollout-trainer agreement (`agreement_mean`, `agreement_max` over `agreement_tokens`
        tokens: `logprob_agreement`)."""
        num_parts = max(1, min(self.config.minibatches_per_step, len(trajectories)))
        minibatches = [
            self.prepare([trajectories[i] for i in part], [advantages[i] for i in part])
            for part in split_into_minibatches(len(trajectories), num_parts, seed=self.version)
        ]
        agreement = {}
        if self.config.objective is Objective.decoupled:  # with naive, nothing is recomputed to compare
            totals = read_stats(agreement_totals([b for part in minibatches for b in part], self.version))
            agreement = agreement_stats(totals["sum"], totals["max"], totals["tokens"])
        updates = []
        for micro_batches in minibatches:
            self.optimizer.zero_grad(set_to_none=True)
            stats = self.backward(micro_batches)
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
            stats["lr"] = self.scheduler.get_last_lr()[0]  # the rate this update uses
            self.optimizer.step()
            self.scheduler.step()
            updates.append(stats)
        self.version += 1
        return combine_update_stats(updates) | agreement | {
            "trained_tokens": float(sum(t.num_tokens for t in trajectories))}
