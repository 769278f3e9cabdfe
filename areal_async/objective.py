"""The critic-free PPO objective as pure functions (see DESIGN.md, "The objective").

Shapes: [batch, seq] token tensors; every loss is a token mean over `loss_mask`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from areal_async.types import Trajectory

LOG_RATIO_LIMIT = 20.0  # log-ratios are clamped to +-20 before exp (as verl does): no inf, no overflowed grads


def group_advantages(rewards: torch.Tensor, normalise_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards [groups, G] -> advantages [groups, G]: reward minus its group mean (optionally over the group std).

    With gamma = lambda = 1 and no critic, every output token of a sample gets its sample's advantage.
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if normalise_std:
        centred = centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)
    return centred


def batch_advantages(rewards: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N], output lengths [N] -> advantages [N]: (reward - mean) / std over every output token of the
    batch, each sample's reward counted once per token it generated (AReaL v0.1's token-level adv_norm with
    every token of a sample carrying its reward)."""
    weights = lengths.to(rewards.dtype) / lengths.sum().clamp(min=1)
    mean = (weights * rewards).sum()
    std = (weights * (rewards - mean) ** 2).sum().sqrt()
    return (rewards - mean) / (std + eps)


def trajectory_advantages(trajectories: Sequence[Trajectory], norm: str = "group") -> list[float]:
    """One advantage per trajectory (groups keyed by group_id, any order); `norm` is an AdvantageNorm value:
    "group" (minus the group mean), "group_std" (and over the group std), "batch" (batch_advantages), "none"."""
    rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    if norm == "none":
        return rewards.tolist()
    if norm == "batch":
        lengths = torch.tensor([t.num_model_tokens for t in trajectories], dtype=torch.float64)
        return batch_advantages(rewards, lengths).tolist()
    if norm not in ("group", "group_std"):
        raise ValueError(f"advantage norm must be group, group_std, batch or none, got {norm!r}")
    by_group: dict[str, list[int]] = defaultdict(list)
    for index, trajectory in enumerate(trajectories):
        by_group[trajectory.group_id].append(index)
    advantages = [0.0] * len(trajectories)
    for indices in by_group.values():
        centred = group_advantages(rewards[indices][None], normalise_std=norm == "group_std")[0]
        for i, value in zip(indices, centred.tolist()):
            advantages[i] = value
    return advantages


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True; 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def logprob_agreement(behaviour_logprobs: torch.Tensor, proximal_logprobs: torch.Tensor, versions: torch.Tensor,
                      mask: torch.Tensor, version: int) -> dict[str, torch.Tensor]:
    """How far the engine's behaviour logprobs are from the learner's recomputation of the same tokens with the
    same weights: |behaviour - proximal| over the output tokens (mask [N] bool) that `version` sampled (versions
    [N]), the weights the proximal logprobs were recomputed with; other tokens differ by design. All [N].
    Returns 0-d fp64 tensors "sum", "max" and "tokens" (all 0 when no token qualifies), which add (and max)
    over packs and ranks. Zero up to kernel differences: a drift says the two stacks disagree."""
    same = mask & (versions == version)
    gap = torch.where(same, (behaviour_logprobs.double() - proximal_logprobs.double()).abs(), 0.0)
    return {"sum": gap.sum(), "max": gap.max() if gap.numel() else gap.sum(), "tokens": same.sum().double()}


def decoupled_ppo_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_clip: float = 0.2,
    behaviour_weight_cap: float | None = None,
    behaviour_weight_mode: str = "clip",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO clip loss. All inputs [batch, seq]; returns (scalar loss, stats).

    u = exp(logprobs - proximal) is clipped to [1 - eps, 1 + eps] as in PPO; the behaviour weight
    w = exp(proximal - behaviour) (no gradient) corrects for data sampled by older policies. A cap on w
    either clips it (`behaviour_weight_mode="clip"`) or drops tokens above the cap from the loss ("mask",
    as AReaL does); dropped tokens still count in the denominator so the loss scale does not depend on
    how many were dropped. With proximal == behaviour this is the standard PPO clip loss. Both log-ratios are
    clamped to +-LOG_RATIO_LIMIT before exp.
    """
    if behaviour_weight_mode not in ("clip", "mask"):
        raise ValueError(f"behaviour_weight_mode must be 'clip' or 'mask', got {behaviour_weight_mode!r}")
    mask = loss_mask.bool()
    ratio = torch.exp((logprobs - proximal_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip) * advantages
    surrogate = torch.minimum(unclipped, clipped)

    behaviour_log_ratio = (proximal_logprobs - behaviour_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    behaviour_weight = torch.exp(behaviour_log_ratio).detach()
    trained = mask
    if behaviour_weight_cap is not None:
        if behaviour_weight_mode == "clip":
            behaviour_weight = behaviour_weight.clamp(max=behaviour_weight_cap)
        else:
            trained = mask & (behaviour_weight <= behaviour_weight_cap)
    per_token = -behaviour_weight * surrogate
    loss = (per_token * trained).sum() / mask.sum().clamp(min=1)

    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped < unclipped).float(), mask),
            # over the tokens trained on (in mask mode, those under the cap); `dropped_fraction` is the rest
            "behaviour_weight_mean": masked_mean(behaviour_weight, trained),
            # 0 when nothing is trained, decided on the device: `if trained.any()` would stall the host until
            # the forward pass had finished, before it could queue the backward pass.
            "behaviour_weight_max": torch.where(
                trained.any(), behaviour_weight.masked_fill(~trained, float("-inf")).max(), 0.0
            )
            if mask.numel()
            else behaviour_weight.new_zeros(()),
            "dropped_fraction": masked_mean((mask & ~trained).float(), mask),
            "approx_kl": masked_mean(proximal_logprobs - logprobs, mask),
        }
    return loss, stats


def kl_penalty(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean k3 estimate of KL(pi_theta || pi_ref): exp(r) - r - 1 with r = ref - logprobs. [B, T] -> scalar.

    Non-negative, unbiased for sampled tokens, and its gradient pulls logprobs towards the reference.
    """
    log_ratio = (reference_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, loss_mask)


def kl_reward_to_go(proximal_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, output_mask: torch.Tensor,
                    document_ids: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The KL penalty as a per-token reward (AReaL's kl_ctl): r_t = -kl_coef (proximal_t - reference_t) on each
    output token, summed from each token to the end of its own sequence (gamma = lambda = 1, no critic: the
    return-to-go that the token's advantage gains). All [N] over one packed row; document_ids [N] number its
    sequences in order (PackedBatch). 0 where output_mask is False."""
    rewards = torch.where(output_mask, -kl_coef * (proximal_logprobs - reference_logprobs), 0.0)
    before = torch.cumsum(rewards, 0) - rewards  # the row's rewards before each token
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[1:] = document_ids[1:] != document_ids[:-1]
    start_index = torch.cummax(torch.where(starts, torch.arange(len(rewards), device=rewards.device), 0), 0).values
    totals = torch.zeros_like(rewards).index_add_(0, document_ids, rewards)  # per sequence (ids < N: no host read)
    # the sequence's total less what came before the token within it
    to_go = totals[document_ids] - (before - before[start_index])
    return torch.where(output_mask, to_go, 0.0)
