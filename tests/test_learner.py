"""The learner: micro-batching does not change the gradient; a step moves probability towards reward."""

import copy

import numpy as np
import pytest
import torch

from actors.engine import TorchEngine
from actors.sampling import SamplingParams
from areal_async.config import Objective, PPOConfig
from areal_async.model import sequence_logprobs
from areal_async.packing import pad_prompt_output_batch
from areal_async.types import Trajectory
from learners.ppo_learner import PPOLearner, trajectory_advantages


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


def _gradients(learner, trajectories):
    learner.optimizer.zero_grad(set_to_none=True)
    learner.backward(learner.prepare(trajectories))
    return {n: p.grad.clone() for n, p in learner.model.named_parameters()}


def test_gradient_is_independent_of_micro_batch_budget(tiny_model):
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]])
    whole = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=10**6), pad_token_id=0, temperature=1.0)
    split = PPOLearner(copy.deepcopy(tiny_model), PPOConfig(micro_batch_tokens=20), pad_token_id=0, temperature=1.0)
    assert len(split.prepare(trajectories)) > 2
    reference, micro = _gradients(whole, trajectories), _gradients(split, trajectories)
    for name in reference:
        scale = reference[name].abs().max().item() + 1e-12
        assert (reference[name] - micro[name]).abs().max().item() / scale < 1e-5, name


def test_trajectory_advantages_are_group_centred():
    def t(group, reward):
        z = np.zeros(1, dtype=np.int32)
        return Trajectory("q", group, 0, z + 1, z, z.astype(np.float32), z, reward, "stop")

    advantages = trajectory_advantages([t("a", 5.0), t("b", 5.0), t("a", -5.0), t("a", 5.0), t("b", -5.0)], False)
    assert advantages == pytest.approx([10 / 3, 5.0, -20 / 3, 10 / 3, -5.0])


@pytest.mark.parametrize("objective", [Objective.decoupled, Objective.naive])
def test_step_raises_logprob_of_rewarded_samples(tiny_model, objective):
    trajectories = _trajectories(tiny_model, [[1, 2, 3], [4, 5]], group_size=6, seed=2)
    config = PPOConfig(lr=1e-2, objective=objective, kl_coef=0.01)
    learner = PPOLearner(copy.deepcopy(tiny_model), config, pad_token_id=0, temperature=1.0)

    def mean_logprob(reward):
        chosen = [t for t in trajectories if t.reward == reward]
        batch = pad_prompt_output_batch([t.prompt_tokens for t in chosen], [t.output_tokens for t in chosen], 0)
        with torch.no_grad():
            lp = sequence_logprobs(learner.model, batch.input_ids, batch.valid)
        return lp[batch.output_mask].mean().item()

    good_before, bad_before = mean_logprob(5.0), mean_logprob(-5.0)
    stats = learner.train_step(trajectories)
    assert learner.version == 1
    assert mean_logprob(5.0) > good_before and mean_logprob(-5.0) < bad_before
    assert stats["behaviour_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["kl_reference"] == pytest.approx(0.0, abs=1e-8)
