"""The critic-free PPO objective against hand-computed values."""

import math

import pytest
import torch

from areal_async.objective import decoupled_ppo_loss, group_advantages, kl_penalty, kl_reward_to_go, logprob_agreement

LOG = math.log


def _case():
    # token 1: u = 1.1 inside the clip range; token 2: u = 1.8 clipped to 1.2, behaviour weight 2;
    # token 3: u = 0.5 with A < 0, clipped to 0.8; token 4: masked out.
    logprobs = torch.tensor([[LOG(0.55), LOG(0.9), LOG(0.2), LOG(0.7)]], requires_grad=True)
    proximal = torch.tensor([[LOG(0.5), LOG(0.5), LOG(0.4), LOG(0.1)]])
    behaviour = torch.tensor([[LOG(0.5), LOG(0.25), LOG(0.4), LOG(0.1)]])
    advantages = torch.tensor([[1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    return logprobs, proximal, behaviour, advantages, mask


def test_decoupled_loss_hand_computed():
    logprobs, proximal, behaviour, advantages, mask = _case()
    loss, stats = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, eps_clip=0.2)
    # per token: -1 * 1.1 * 1 ; -2 * (1.2 * 2) ; -1 * (0.8 * -1)  -> (-1.1 - 4.8 + 0.8) / 3
    assert loss.item() == pytest.approx(-1.7, abs=1e-6)
    loss.backward()
    # only the unclipped token carries gradient: d/dlogp (-w u A) = -w u A, over 3 tokens
    expected = torch.tensor([[-1.1 / 3, 0.0, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["behaviour_weight_mean"].item() == pytest.approx(4 / 3, abs=1e-6)
    assert stats["behaviour_weight_max"].item() == pytest.approx(2.0, abs=1e-6)
    assert stats["dropped_fraction"].item() == 0.0


def test_behaviour_weight_cap_clip_and_mask():
    logprobs, proximal, behaviour, advantages, mask = _case()
    clipped, _ = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, behaviour_weight_cap=1.5)
    assert clipped.item() == pytest.approx((-1.1 - 1.5 * 2.4 + 0.8) / 3, abs=1e-6)
    masked, stats = decoupled_ppo_loss(
        logprobs, proximal, behaviour, advantages, mask, behaviour_weight_cap=1.5, behaviour_weight_mode="mask"
    )
    assert masked.item() == pytest.approx((-1.1 + 0.8) / 3, abs=1e-6)
    assert stats["dropped_fraction"].item() == pytest.approx(1 / 3)
    # the weights' stats are over the tokens trained on (weights 1 and 1), not the dropped one (2)
    assert stats["behaviour_weight_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["behaviour_weight_max"].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="behaviour_weight_mode"):
        decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, behaviour_weight_mode="drop")


def test_equals_standard_ppo_when_proximal_is_behaviour():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(4, 7, generator=generator) - 2
    new = (old + 0.3 * torch.randn(4, 7, generator=generator)).requires_grad_(True)
    advantages = torch.randn(4, 1, generator=generator).expand(4, 7)
    mask = torch.rand(4, 7, generator=generator) > 0.3
    loss, _ = decoupled_ppo_loss(new, old, old, advantages, mask, eps_clip=0.2)
    ratio = torch.exp(new - old)
    standard = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    assert loss.item() == pytest.approx((standard[mask]).mean().item(), abs=1e-6)


def test_log_ratios_are_clamped_to_plus_minus_20_before_exp():
    """A token whose logprob moved by 50 nats: u = e^20 (clipped in the loss to 1 + eps, but the stats and the
    mask's weight see it finite); behaviour weight e^-20 and e^20 from log-ratios of -30 and +25; the k3 KL
    of a log-ratio of 40 uses 20."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    proximal = torch.tensor([[-51.0, -2.0, -3.0]])
    behaviour = torch.tensor([[-51.0, 28.0, -28.0]])
    advantages = torch.tensor([[-1.0, 1.0, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, eps_clip=0.2)
    # token 1: u = e^20, A = -1: min(-e^20, -1.2) = -e^20, w = 1; token 2: u = 1, w = e^-20; token 3: u = 1, w = e^20
    expected = (math.exp(20) - math.exp(-20) - 0.5 * math.exp(20)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["behaviour_weight_max"].item() == pytest.approx(math.exp(20), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    reference = torch.tensor([[39.0]])
    assert kl_penalty(torch.tensor([[-1.0]]), reference, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(
        math.exp(20) - 20 - 1, rel=1e-6)


def test_group_advantages():
    rewards = torch.tensor([[5.0, -5.0, 5.0, 5.0], [-5.0, -5.0, -5.0, -5.0]])
    assert torch.equal(group_advantages(rewards), torch.tensor([[2.5, -7.5, 2.5, 2.5], [0.0, 0.0, 0.0, 0.0]]))
    normalised = group_advantages(rewards, normalise_std=True)
    std = math.sqrt((3 * 2.5**2 + 7.5**2) / 4)
    assert normalised[0, 1].item() == pytest.approx(-7.5 / std, rel=1e-5)
    assert torch.equal(normalised[1], torch.zeros(4))


def test_kl_penalty_k3():
    logprobs = torch.tensor([[LOG(0.5), LOG(0.2)]])
    reference = torch.tensor([[LOG(0.25), LOG(0.2)]])
    r = LOG(0.25) - LOG(0.5)
    expected = (math.exp(r) - r - 1) / 2
    assert kl_penalty(logprobs, reference, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(expected)


def test_logprob_agreement_counts_only_the_current_versions_output_tokens():
    behaviour = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    proximal = torch.tensor([-1.25, -2.0, -0.25, -9.0, -1.5])
    versions = torch.tensor([3, 3, 3, 2, 3])
    mask = torch.tensor([True, True, True, True, False])  # the last is a prompt position
    got = logprob_agreement(behaviour, proximal, versions, mask, version=3)
    # tokens 0..2 qualify: |gaps| 0.25, 0, 0.25; token 3 (version 2) differs by design; token 4 is not output
    assert {name: float(value) for name, value in got.items()} == {"sum": 0.5, "max": 0.25, "tokens": 3.0}
    assert {name: float(value) for name, value in logprob_agreement(
        behaviour, proximal, versions, mask, version=4).items()} == {"sum": 0.0, "max": 0.0, "tokens": 0.0}


def test_kl_reward_to_go_by_hand():
    # one packed row, two sequences: prompt tokens (mask False), then outputs
    proximal = torch.tensor([0.0, -1.0, -2.0, 0.0, 0.0, -1.0, -3.0])
    reference = torch.tensor([0.0, -2.0, -2.0, 0.0, 0.0, -2.0, -1.0])
    mask = torch.tensor([False, True, True, False, False, True, True])
    documents = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    # rewards -0.5 (prox - ref): -0.5, 0 | -0.5, +1.0; summed to the end of each sequence, never across it
    assert kl_reward_to_go(proximal, reference, mask, documents, 0.5).tolist() == [0.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0]
    assert kl_reward_to_go(proximal, proximal, mask, documents, 0.5).abs().sum() == 0  # at the reference: nothing
