"""The learner: packing and splitting over ranks do not change the gradient; a step moves probability towards
reward."""

import copy
import math

import numpy as np
import pytest
import torch

from actors.engine import TorchEngine
from areal_async.types import SamplingParams, Trajectory
from areal_async.config import Objective, PPOConfig
from areal_async.model import sequence_logprobs
from areal_async.objective import decoupled_ppo_loss
from areal_async.packing import balance_across_ranks, pad_prompt_output_batch
from areal_async.objective import trajectory_advantages
from learners.ppo_learner import PPOLearner


def _trajectories(model, prompts, group_size=4, seed=0):
    engine = TorchEngine(copy.deepcopy(model), pad_token_id=0)
    requests = [(g, p) for g, p in enumerate(prompts) for _ in range(group_size)]
    outputs = engine.generate([p for _, p in requests], SamplingParams(max_new_tokens=8, seed=seed))
    rng = np.random.default_rng(seed)
    return [
        Trajectory(f"q{g}", f"g{g}", i % group_size, np.array(p, dtype=np.int32), np.array(o.tokens, dtype=np.int32),
                   np.array(o.logprobs, dtype=np.float32), np.array(o.versions, dtype=np.int32),
                   float(rng.choice([5.0, -5.0])), o.finish_reason)
        for i, ((g, p), o) in enumerate(zip(requests, outputs))
    ]


def _advantages(trajectories):
    return trajectory_advantages(trajectories, "group")


def _gradients(learner, trajectories):
    learner.optimizer.zero_grad(set_to_none=True)
    learner.backward(learner.prepare(trajectories, _advantages(trajectories)))
    return {n: p.grad.clone() for n, p in learner.model.named_parameters()}


def _max_relative_difference(reference: dict, other: dict) -> float:
    return max((reference[n] - other[n]).abs().max().item() / (reference[n].abs().max().item() + 1e-12)
               for n in reference)


def test_gradient_is_independent_of_micro_batch_budget(tiny_model):
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]])
    whole = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=10**6), pad_token_id=0, temperature=1.0)
    split = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=20), pad_token_id=0, temperature=1.0)
    assert len(split.prepare(trajectories, _advantages(trajectories))) > 2
    assert _max_relative_difference(_gradients(whole, trajectories), _gradients(split, trajectories)) < 1e-5


def test_packed_gradient_equals_the_padded_full_batch_gradient(tiny_model):
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]], seed=1)
    learner = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=20), pad_token_id=0, temperature=1.0)
    assert len(learner.prepare(trajectories, _advantages(trajectories))) > 2
    packed = _gradients(learner, trajectories)

    # The same loss, written directly over one padded batch: proximal = current weights, before the update.
    model = copy.deepcopy(tiny_model)
    advantages = trajectory_advantages(trajectories, "group")
    batch = pad_prompt_output_batch(
        [t.prompt_tokens for t in trajectories], [t.output_tokens for t in trajectories], pad_token_id=0,
        per_token={"behaviour": [t.behaviour_logprobs for t in trajectories],
                   "advantages": [np.full(len(t.output_tokens), a) for t, a in zip(trajectories, advantages)]},
    )
    logprobs = sequence_logprobs(model, batch.input_ids, batch.valid)
    loss, _ = decoupled_ppo_loss(logprobs, logprobs.detach(), batch.values["behaviour"], batch.values["advantages"],
                                 batch.output_mask)
    loss.backward()
    padded = {n: p.grad for n, p in model.named_parameters()}
    assert _max_relative_difference(padded, packed) < 1e-5


def test_tokens_an_episode_put_in_are_left_out_of_the_loss_and_its_token_count(tiny_model):
    """A multi-turn trajectory's tool and user tokens (loss mask 0) are context only: the gradient equals the
    padded full-batch loss over the model's tokens alone, with the token mean over those."""
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], seed=2)
    rng = np.random.default_rng(0)
    for t in trajectories:
        t.loss_mask = (rng.random(len(t.output_tokens)) < 0.6).astype(np.uint8)
        t.loss_mask[0] = 1
    learner = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=20), pad_token_id=0, temperature=1.0)
    packs = learner.prepare(trajectories, _advantages(trajectories))
    assert sum(p.num_output_tokens for p in packs) == sum(int(t.loss_mask.sum()) for t in trajectories)
    packed = _gradients(learner, trajectories)

    model = copy.deepcopy(tiny_model)
    advantages = trajectory_advantages(trajectories, "group")
    batch = pad_prompt_output_batch(
        [t.prompt_tokens for t in trajectories], [t.output_tokens for t in trajectories], pad_token_id=0,
        per_token={"behaviour": [t.behaviour_logprobs for t in trajectories], "model": [t.loss_mask for t in trajectories],
                   "advantages": [np.full(len(t.output_tokens), a) for t, a in zip(trajectories, advantages)]},
    )
    logprobs = sequence_logprobs(model, batch.input_ids, batch.valid)
    loss, _ = decoupled_ppo_loss(logprobs, logprobs.detach(), batch.values["behaviour"], batch.values["advantages"],
                                 batch.output_mask & (batch.values["model"] > 0))
    loss.backward()
    assert _max_relative_difference({n: p.grad for n, p in model.named_parameters()}, packed) < 1e-5


def test_rank_gradients_add_up_to_the_one_rank_gradient(tiny_model):
    """Two data-parallel ranks, each with part of the groups' samples: with the global token count as the
    normaliser and loss_scale = 2 (a reduction that averages), the mean of their gradients is the whole one."""
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]], seed=3)
    config = PPOConfig(micro_batch_tokens=20)
    whole = _gradients(PPOLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0), trajectories)
    advantages = trajectory_advantages(trajectories, config.advantage_norm.value)
    total_output_tokens = sum(len(t.output_tokens) for t in trajectories)
    rank_gradients = []
    for indices in balance_across_ranks([t.num_tokens for t in trajectories], num_ranks=2):
        rank = PPOLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0)
        packs = rank.prepare([trajectories[i] for i in indices], [advantages[i] for i in indices])
        rank.backward(packs, loss_scale=2.0, total_output_tokens=total_output_tokens)
        rank_gradients.append({n: p.grad for n, p in rank.model.named_parameters()})
    averaged = {n: (rank_gradients[0][n] + rank_gradients[1][n]) / 2 for n in whole}
    assert _max_relative_difference(whole, averaged) < 1e-5


def test_trajectory_advantages_are_group_centred():
    def t(group, reward):
        z = np.zeros(1, dtype=np.int32)
        return Trajectory("q", group, 0, z + 1, z, z.astype(np.float32), z, reward, "stop")

    advantages = trajectory_advantages([t("a", 5.0), t("b", 5.0), t("a", -5.0), t("a", 5.0), t("b", -5.0)], "group")
    assert advantages == pytest.approx([10 / 3, 5.0, -20 / 3, 10 / 3, -5.0])


def test_trajectory_advantages_by_norm_hand_computed():
    def t(group, reward, length):
        z = np.zeros(length, dtype=np.int32)
        return Trajectory("q", group, 0, z[:1] + 1, z, z.astype(np.float32), z, reward, "stop")

    batch = [t("a", 5.0, 1), t("a", -5.0, 3), t("b", 5.0, 2), t("b", 5.0, 2)]
    # batch: 8 output tokens, 5 of them rewarded +5: mean 5 * (5 - 3) / 8 = 1.25; variance
    # (5 * 3.75^2 + 3 * 6.25^2) / 8 = 23.4375, std 4.8412
    std = math.sqrt(23.4375)
    assert trajectory_advantages(batch, "batch") == pytest.approx(
        [3.75 / std, -6.25 / std, 3.75 / std, 3.75 / std], rel=1e-5)
    assert trajectory_advantages(batch, "none") == [5.0, -5.0, 5.0, 5.0]
    assert trajectory_advantages(batch, "group_std") == pytest.approx([1.0, -1.0, 0.0, 0.0], rel=1e-5)
    with pytest.raises(ValueError, match="advantage norm"):
        trajectory_advantages(batch, "rank")


@pytest.mark.parametrize("objective", [Objective.decoupled, Objective.naive])
def test_step_raises_logprob_of_rewarded_samples(tiny_model, objective):
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5]], group_size=6, seed=2)
    # one update: the KL to the reference (the starting weights) is 0 at it
    config = PPOConfig(lr=1e-2, objective=objective, kl_coef=0.01, minibatches_per_step=1)
    learner = PPOLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0)

    def mean_logprob(reward):
        chosen = [t for t in trajectories if t.reward == reward]
        batch = pad_prompt_output_batch([t.prompt_tokens for t in chosen], [t.output_tokens for t in chosen], 0)
        with torch.no_grad():
            lp = sequence_logprobs(learner.model, batch.input_ids, batch.valid)
        return lp[batch.output_mask].mean().item()

    good_before, bad_before = mean_logprob(5.0), mean_logprob(-5.0)
    stats = learner.train_step(trajectories, _advantages(trajectories))
    assert learner.version == 1
    assert mean_logprob(5.0) > good_before and mean_logprob(-5.0) < bad_before
    assert stats["behaviour_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["kl_reference"] == pytest.approx(0.0, abs=1e-8)


def test_kl_as_a_reward_moves_the_advantages_not_the_loss(tiny_model):
    """ppo.kl_mode=reward (AReaL's kl_ctl): each output token's advantage gains the KL reward summed to the end
    of its sequence, -kl_coef (log pi_prox - log pi_ref); the loss then holds no KL term."""
    from areal_async.config import KLMode
    from areal_async.objective import kl_reward_to_go

    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5]], group_size=4, seed=2)
    advantages = _advantages(trajectories)
    learners = {}
    for mode in KLMode:
        config = PPOConfig(lr=1e-2, kl_coef=0.5, kl_mode=mode, minibatches_per_step=1)
        learner = PPOLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0)
        torch.manual_seed(7)  # the same move for both learners
        with torch.no_grad():  # the policy moves off its reference, so the two differ
            for param in learner.model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        learners[mode] = learner
    by_loss, by_reward = (learners[mode].prepare(trajectories, advantages) for mode in (KLMode.loss, KLMode.reward))
    for plain, rewarded in zip(by_loss, by_reward):
        values = rewarded.values
        expected = plain.values["advantages"] + kl_reward_to_go(
            values["proximal_logprobs"], values["reference_logprobs"], rewarded.output_mask, rewarded.document_ids[0],
            0.5)
        assert torch.allclose(values["advantages"], expected)
        assert not torch.allclose(values["advantages"], plain.values["advantages"])
    # on the same packs and weights the two losses differ by exactly the KL term, which only the loss mode adds
    stats = {mode: learners[mode].backward(by_reward) for mode in KLMode}
    kl = stats[KLMode.reward]["kl_reference"]
    assert kl > 0 and stats[KLMode.loss]["loss"] == pytest.approx(stats[KLMode.reward]["loss"] + 0.5 * kl)


def _changed_fraction(before: dict, after: dict) -> float:
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_the_inline_learner_keeps_fp32_master_weights_and_publishes_bf16(tiny_model):
    """Small updates accumulate in the fp32 masters: bf16 parameters updated in place round most of them away."""
    from learners.fsdp_learner import FSDPLearner

    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7], [8, 9]])
    config = PPOConfig(lr=2e-6)
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    master = FSDPLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0,
                         compute_dtype=torch.bfloat16, publish_dtype=torch.bfloat16)
    in_place = PPOLearner(copy.deepcopy(bf16), config, pad_token_id=0, temperature=1.0)
    assert all(p.dtype == torch.float32 for p in master.model.parameters())
    start = {n: t.clone() for n, t in master.policy_state().items()}
    assert all(t.dtype == torch.bfloat16 for t in start.values())
    assert all(torch.equal(start[n], t) for n, t in bf16.state_dict().items() if n in start)
    for _ in range(10):
        master.train_step(trajectories, _advantages(trajectories))
        in_place.train_step(trajectories, _advantages(trajectories))
    published = master.policy_state()
    assert all(torch.equal(published[n], p.detach().to(torch.bfloat16)) for n, p in master.model.named_parameters())
    master_changed = _changed_fraction(start, published)
    in_place_changed = _changed_fraction(start, in_place.policy_state())
    assert master_changed > 2 * in_place_changed, (master_changed, in_place_changed)


@pytest.mark.parametrize("budget", [10**6, 20])
@pytest.mark.parametrize("kind", ["ppo", "fsdp"])
def test_minibatches_are_shuffled_trajectories_one_update_each_whatever_the_budget(tiny_model, budget, kind):
    """Minibatches were slices of the (longest-first) pack list: their number followed the token budget."""
    from learners.fsdp_learner import FSDPLearner

    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]])
    config = PPOConfig(micro_batch_tokens=budget, minibatches_per_step=4)
    if kind == "ppo":
        learner = PPOLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0)
    else:
        learner = FSDPLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0)
    trained = []  # the trajectories of each minibatch, in update order
    prepare = learner.prepare
    learner.prepare = lambda part, advantages: trained.append(sorted(t.num_tokens for t in part)) or prepare(
        part, advantages)
    updates = []
    step = learner.optimizer.step
    learner.optimizer.step = lambda *args, **kwargs: updates.append(1) or step(*args, **kwargs)
    stats = learner.train_step(trajectories, _advantages(trajectories))
    assert len(updates) == 4 and len(trained) == 4
    assert sorted(n for part in trained for n in part) == sorted(t.num_tokens for t in trajectories)
    assert [len(part) for part in trained] == [4, 4, 4, 4]
    assert stats["trained_tokens"] == sum(t.num_tokens for t in trajectories)
    # shuffled, not longest first: some minibatch holds both a sequence of the longest and of the shortest prompt
    assert any(part[0] < part[-1] for part in trained)


def test_update_stats_combine_by_mean_and_the_weight_max_by_max():
    from learners.ppo_learner import combine_update_stats

    combined = combine_update_stats([{"loss": 1.0, "behaviour_weight_max": 3.0, "lr": 2.0},
                                     {"loss": 4.0, "behaviour_weight_max": 1.5, "lr": 2.0}])
    assert combined == {"loss": 2.5, "behaviour_weight_max": 3.0, "lr": 2.0}
    assert combine_update_stats([]) == {}


def test_a_step_reports_the_rollout_trainer_agreement_of_its_current_version(tiny_model):
    """The engine's behaviour logprobs of the tokens sampled with the learner's current weights against the
    learner's recomputation (invariant 4 in every step): equal within fp32 rounding on a CPU; tokens of
    other versions are left out."""
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], seed=2)
    learner = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=20), pad_token_id=0, temperature=1.0)
    stats = learner.train_step(trajectories, _advantages(trajectories))
    assert stats["agreement_tokens"] == sum(len(t.output_tokens) for t in trajectories)
    assert 0 <= stats["agreement_mean"] <= stats["agreement_max"] < 1e-5
    stale = learner.train_step(trajectories, _advantages(trajectories))  # version 1 now: every token is older
    assert stale["agreement_tokens"] == 0 and "agreement_max" not in stale
    naive = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(objective=Objective.naive), pad_token_id=0,
                       temperature=1.0)
    assert "agreement_tokens" not in naive.train_step(trajectories, _advantages(trajectories))


def _weights_after_a_step(model, trajectories, **ppo) -> dict[str, torch.Tensor]:
    learner = PPOLearner(copy.deepcopy(model), PPOConfig(lr=0.05, micro_batch_tokens=10**6, **ppo), pad_token_id=0,
                         temperature=1.0)
    learner.train_step(trajectories, _advantages(trajectories))
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


def test_eps_clip_acts_from_the_second_minibatch_and_never_with_one(tiny_model):
    """With one update a step, the update runs at the proximal weights: u = pi_theta / pi_prox is 1 and the clip
    cannot act (the review's finding: bitwise equal weights for any eps_clip). With 4 minibatches, updates 2 to 4
    run at moved weights, and eps_clip changes the result. The behaviour logprobs are stale (shifted), as from an
    older version."""
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]], seed=3)
    for trajectory in trajectories:
        trajectory.behaviour_logprobs = trajectory.behaviour_logprobs - 0.3
    for parts, differ in ((1, False), (4, True)):
        tight, loose = (_weights_after_a_step(tiny_model, trajectories, minibatches_per_step=parts, eps_clip=eps)
                        for eps in (0.01, 1e6))
        largest = max((tight[name] - loose[name]).abs().max().item() for name in tight)
        assert (largest > 1e-4) == differ, (parts, largest)
