"""FSDP2 learner ranks on CPU (gloo): a 2-rank step equals the 1-rank step of the same batch (loss, gradient,
updated weights), whatever the micro-batch budget or the split; activation checkpointing leaves the gradient
unchanged."""

from __future__ import annotations

import copy
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from actors.engine import TorchEngine
from areal_async.types import SamplingParams, Trajectory
from areal_async.config import AdvantageNorm, LearnerConfig, OneRankMode, PPOConfig
from areal_async.model import CausalLM, DecoderConfig
from areal_async.packing import split_into_packs
from conftest import TINY
from learners import fsdp_learner
from learners.fsdp_learner import FSDPLearner, RankShare, split_step_across_ranks
from learners import ppo_learner
from learners.ppo_learner import PPOLearner, warmup_factor
from areal_async.objective import trajectory_advantages

WORLD = 2
TOLERANCE = 1e-5  # relative, fp32
HUGE_BUDGET, TINY_BUDGET = 10**6, 8


@dataclass
class Case:
    """A one-step 2-rank run: its PPO config and each rank's share of the batch."""

    name: str
    config: PPOConfig
    shares: list[RankShare]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trajectories(model: CausalLM, prompts, group_size: int) -> list[Trajectory]:
    """group_size samples per prompt, as if sampled by an older policy: outputs cut to 3..8 tokens, behaviour
    logprobs perturbed (so behaviour weights differ from 1 and the first step's loss is not 0). Rewards
    alternate +5/-5 over the batch: with an odd group size every group has both."""
    engine = TorchEngine(copy.deepcopy(model), pad_token_id=0)
    requests = [(g, p) for g, p in enumerate(prompts) for _ in range(group_size)]
    outputs = engine.generate([p for _, p in requests], SamplingParams(max_new_tokens=8, seed=0))
    rng = np.random.default_rng(0)
    trajectories = []
    for i, ((g, prompt), output) in enumerate(zip(requests, outputs)):
        kept = 3 + (5 * i) % 6
        behaviour = np.array(output.logprobs[:kept], dtype=np.float32) + rng.normal(0, 0.3, kept).astype(np.float32)
        trajectories.append(Trajectory(
            f"q{g}", f"g{g}", i % group_size, np.array(prompt, dtype=np.int32),
            np.array(output.tokens[:kept], dtype=np.int32), behaviour, np.zeros(kept, dtype=np.int32),
            5.0 if i % 2 else -5.0, "length",
        ))
    return trajectories


def relative_diff(values: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """max over tensors of max|a - b| / max|b|."""
    assert values.keys() == reference.keys()
    return max(float(np.abs(values[n] - reference[n]).max() / (np.abs(reference[n]).max() + 1e-12)) for n in reference)


def one_rank_step(learner: PPOLearner, trajectories: list[Trajectory]) -> dict:
    """Stats, the (clipped) gradient and the weights after one unsharded train_step."""
    stats = learner.train_step(trajectories, trajectory_advantages(trajectories, learner.config.advantage_norm.value))
    gradients = {n: p.grad.numpy().copy() for n, p in learner.model.named_parameters()}
    weights = {n: p.detach().numpy().copy() for n, p in learner.model.named_parameters()}
    return {"stats": stats, "gradients": gradients, "weights": weights}


def full_gradient(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole gradient of a parameter, sharded (a DTensor: gathered) or not."""
    from torch.distributed.tensor import DTensor

    return param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad


def sharded_step(learner: FSDPLearner, share: RankShare) -> dict:
    """The same after one sharded train_step; every rank calls it, the full weights are on rank 0 only. The
    gradient is read right after the optimizer step (train_step drops it before returning)."""
    gradients = {}

    def read_gradients(*_) -> None:
        gradients.update({n: full_gradient(p).numpy().copy() for n, p in learner.model.named_parameters()})

    hook = learner.optimizer.register_step_post_hook(read_gradients)
    stats = learner.train_step(share.trajectories, share.advantages)
    hook.remove()
    assert all(p.grad is None for p in learner.model.parameters())  # nothing held between steps
    weights = {n: t.numpy().copy() for n, t in learner.full_state_dict().items()}
    return {"stats": stats, "gradients": gradients, "weights": weights}


def rank_main(rank: int, port: int, initial_state: dict, cases: list[Case], results) -> None:
    """One spawned learner rank: runs every case's step; rank 0 reports tensors, every rank its stats."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=WORLD, rank=rank,
                                timeout=timedelta(seconds=300))
        for case in cases:
            model = CausalLM(DecoderConfig(**TINY))
            model.load_state_dict(initial_state)
            learner = FSDPLearner(model, case.config, pad_token_id=0, temperature=1.0)
            outcome = sharded_step(learner, case.shares[rank])
            if rank != 0:
                outcome = {"stats": outcome["stats"], "weights": outcome["weights"]}
            results.put((rank, case.name, outcome))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_two_ranks(initial_state: dict, cases: list[Case]) -> dict[tuple[int, str], dict]:
    context = torch_mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=rank_main, args=(rank, port, initial_state, cases, results)) for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = {}
        for _ in range(WORLD * len(cases)):
            rank, name, outcome = results.get(timeout=300)  # spawned ranks import torch: slow on a busy machine
            assert name != "error", f"rank {rank} failed:\n{outcome}"
            outcomes[rank, name] = outcome
        return outcomes
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def batch() -> tuple[CausalLM, list[Trajectory]]:
    torch.manual_seed(0)
    model = CausalLM(DecoderConfig(**TINY))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12], list(range(13, 22))]
    return model, make_trajectories(model, prompts, group_size=3)


def configs() -> dict[str, PPOConfig]:
    """The 2-rank cases, one update each (the comparisons are of one AdamW step). grad_clip sits below the batch's
    gradient norm, so clipping across shards is exercised."""
    one_update = dict(minibatches_per_step=1, grad_clip=0.5)
    return {
        "balanced": PPOConfig(micro_batch_tokens=HUGE_BUDGET, advantage_norm=AdvantageNorm.group_std, **one_update),
        "tiny_budget": PPOConfig(micro_batch_tokens=TINY_BUDGET, advantage_norm=AdvantageNorm.group_std, **one_update),
        "idle_rank_with_kl": PPOConfig(micro_batch_tokens=TINY_BUDGET, kl_coef=0.05, **one_update),
    }


@pytest.fixture(scope="module")
def two_rank_runs(batch) -> dict[tuple[int, str], dict]:
    model, trajectories = batch
    cases = []
    for name, config in configs().items():
        shares = split_step_across_ranks(trajectories, trajectory_advantages(trajectories, config.advantage_norm.value), WORLD)
        if name == "idle_rank_with_kl":
            shares = [RankShare(list(trajectories), trajectory_advantages(trajectories, "group")), RankShare([], [])]
        cases.append(Case(name, config, shares))
    return run_two_ranks(model.state_dict(), cases)


@pytest.fixture(scope="module")
def one_rank_runs(batch) -> dict[str, dict]:
    """The reference: PPOLearner, one process, the whole batch."""
    model, trajectories = batch
    return {
        name: one_rank_step(PPOLearner(copy.deepcopy(model), config, pad_token_id=0, temperature=1.0), trajectories)
        for name, config in configs().items()
    }


def test_split_keeps_whole_group_advantages_and_splits_groups(batch):
    _, trajectories = batch
    shares = split_step_across_ranks(trajectories, trajectory_advantages(trajectories, "group"), WORLD)
    expected = dict(zip((id(t) for t in trajectories), trajectory_advantages(trajectories, "group")))
    assert sorted(id(t) for s in shares for t in s.trajectories) == sorted(expected)
    assert all(a == expected[id(t)] for s in shares for t, a in zip(s.trajectories, s.advantages))
    groups_per_rank = [{t.group_id for t in s.trajectories} for s in shares]
    assert groups_per_rank[0] & groups_per_rank[1], "the test batch should split a group over the ranks"
    # The tiny budget gives the ranks different pack counts, so placeholder packs are exercised.
    pack_counts = [len(split_into_packs([t.num_tokens for t in s.trajectories], TINY_BUDGET)) for s in shares]
    assert pack_counts[0] != pack_counts[1] and min(pack_counts) > 1


def adamw_step(initial: dict[str, np.ndarray], gradients: dict[str, np.ndarray], config: PPOConfig) -> dict:
    """One unsharded AdamW step from `initial` along `gradients`."""
    params = {n: torch.nn.Parameter(torch.from_numpy(value.copy())) for n, value in initial.items()}
    for name, param in params.items():
        param.grad = torch.from_numpy(gradients[name])
    betas = (config.adam_beta1, config.adam_beta2)
    torch.optim.AdamW(params.values(), lr=config.lr, betas=betas, weight_decay=config.weight_decay).step()
    return {n: p.detach().numpy() for n, p in params.items()}


@pytest.mark.parametrize("name", list(configs()))
def test_two_ranks_match_one_rank(two_rank_runs, one_rank_runs, name):
    two, one = two_rank_runs[0, name], one_rank_runs[name]
    for stat in ("loss", "grad_norm", "behaviour_weight_mean", "behaviour_weight_max", "clip_fraction"):
        assert two["stats"][stat] == pytest.approx(one["stats"][stat], rel=TOLERANCE), stat
    assert two["stats"]["trained_tokens"] == one["stats"]["trained_tokens"]
    assert one["stats"]["grad_norm"] > configs()[name].grad_clip
    gradient_diff = relative_diff(two["gradients"], one["gradients"])  # clipped, as the optimizer saw them
    assert gradient_diff < TOLERANCE
    # Against the weights' scale, at the default lr: Adam's first update is about lr * sign(g), so where |g| is
    # near Adam's eps, rounding-level gradient differences change the update itself (by up to ~2e-3 of the
    # largest update here). The sharded step is checked exactly in test_sharded_adamw_step_equals_unsharded_step.
    weight_diff = relative_diff(two["weights"], one["weights"])
    assert weight_diff < TOLERANCE
    assert two_rank_runs[1, name]["stats"] == two["stats"]  # every rank reports the global stats
    assert two_rank_runs[1, name]["weights"] == {}  # full weights on rank 0 only


@pytest.mark.parametrize("name", list(configs()))
def test_sharded_adamw_step_equals_unsharded_step(batch, two_rank_runs, name):
    """The sharded optimizer step applied to the gathered (clipped) gradient is the unsharded AdamW step."""
    initial = {n: p.detach().numpy() for n, p in batch[0].named_parameters()}
    two = two_rank_runs[0, name]
    expected = adamw_step(initial, two["gradients"], configs()[name])
    update_diff = relative_diff({n: two["weights"][n] - initial[n] for n in initial},
                                {n: expected[n] - initial[n] for n in initial})
    assert update_diff < TOLERANCE


def test_two_rank_gradient_is_independent_of_micro_batch_budget(two_rank_runs):
    tiny, huge = two_rank_runs[0, "tiny_budget"], two_rank_runs[0, "balanced"]
    gradient_diff = relative_diff(tiny["gradients"], huge["gradients"])
    assert gradient_diff < TOLERANCE
    assert tiny["stats"]["loss"] == pytest.approx(huge["stats"]["loss"], rel=TOLERANCE)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gradient_and_mlp_calls(model: CausalLM, trajectories, activation_checkpointing: bool,
                           mode: OneRankMode) -> tuple[dict, int]:
    """The full gradient of one backward over the batch, and how often layer 0's MLP ran (forward passes and
    recomputations)."""
    config = PPOConfig(micro_batch_tokens=40, activation_checkpointing=activation_checkpointing)
    learner = FSDPLearner(copy.deepcopy(model), config, pad_token_id=0, temperature=1.0,
                          learner_config=LearnerConfig(one_rank_mode=mode))
    micro_batches = learner.prepare(trajectories, trajectory_advantages(trajectories, "group"))
    mlp, calls = learner.model.model.layers[0].mlp, []
    mlp_forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or mlp_forward(x)  # counts recomputations too, unlike a module hook
    learner.backward(micro_batches)
    return {n: full_gradient(p).numpy() for n, p in learner.model.named_parameters()}, len(calls)


def test_the_sharded_learner_never_moves_the_whole_model_to_its_device(one_rank_group, batch, monkeypatch):
    """A rank shards from where the weights were loaded (fully_shard moves each unit's shard): the whole policy
    and its KL reference copy never sit on the device at once, as they did when PPOLearner moved the model first."""
    model, _ = batch
    moved = []
    to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        if isinstance(module, CausalLM) and (args and not isinstance(args[0], torch.dtype) or "device" in kwargs):
            moved.append((args, kwargs))
        return to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    FSDPLearner(copy.deepcopy(model), PPOConfig(kl_coef=0.1), pad_token_id=0, temperature=1.0,
                learner_config=LearnerConfig(one_rank_mode=OneRankMode.fsdp))
    assert moved == []
    FSDPLearner(copy.deepcopy(model), PPOConfig(kl_coef=0.1), pad_token_id=0, temperature=1.0,
                learner_config=LearnerConfig(one_rank_mode=OneRankMode.plain))
    assert moved  # the plain one-rank learner does move its model (and reference) to the device


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_sharded_learner_computes_in_the_dtype_it_is_given(one_rank_group, batch, compute_dtype):
    """model.dtype reaches FSDP's mixed-precision policy (it was bf16 on CUDA and fp32 on a CPU, whatever was
    asked); the sharded master weights stay fp32."""
    model, trajectories = batch
    learner = FSDPLearner(copy.deepcopy(model), PPOConfig(micro_batch_tokens=40), pad_token_id=0, temperature=1.0,
                          compute_dtype=compute_dtype, learner_config=LearnerConfig(one_rank_mode=OneRankMode.fsdp))
    mlp, seen = learner.model.model.layers[0].mlp, []
    mlp.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, next(module.parameters()).dtype)))
    learner.prepare(trajectories, trajectory_advantages(trajectories, "group"))
    assert seen and all(pair == (compute_dtype, compute_dtype) for pair in seen)
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())


@pytest.mark.parametrize("mode", list(OneRankMode))
def test_activation_checkpointing_keeps_the_gradient(one_rank_group, batch, mode):
    model, trajectories = batch
    stored, stored_calls = gradient_and_mlp_calls(model, trajectories, False, mode)
    recomputed, recomputed_calls = gradient_and_mlp_calls(model, trajectories, True, mode)
    assert recomputed_calls == 2 * stored_calls  # each checkpointed layer ran again in backward
    gradient_diff = relative_diff(recomputed, stored)
    assert gradient_diff < TOLERANCE


@pytest.mark.parametrize("mode", list(OneRankMode))
def test_one_rank_step_matches_unsharded_learner(one_rank_group, batch, one_rank_runs, mode):
    """On one rank, plain (no FSDP) or FSDP-wrapped (the layers keep their gathered parameters from forward to
    backward and the gradients take FSDP's plain one-rank reduction): the step equals PPOLearner's. FSDP's
    parameters are the sharded ones again after a step (also after a forward without backward); the plain
    learner's stay the module's own fp32 tensors."""
    from torch.distributed.tensor import DTensor

    model, trajectories = batch
    config = configs()["balanced"]
    learner = FSDPLearner(copy.deepcopy(model), config, pad_token_id=0, temperature=1.0,
                          learner_config=LearnerConfig(one_rank_mode=mode))
    learner.prepare(trajectories, trajectory_advantages(trajectories, config.advantage_norm.value))
    sharded = mode is OneRankMode.fsdp
    assert learner.sharded == sharded
    assert all(isinstance(p, DTensor) == sharded for p in learner.model.parameters())
    outcome = sharded_step(learner, RankShare(list(trajectories),
                                              trajectory_advantages(trajectories, config.advantage_norm.value)))
    one = one_rank_runs["balanced"]
    for stat in ("loss", "grad_norm", "behaviour_weight_mean", "behaviour_weight_max", "clip_fraction"):
        assert outcome["stats"][stat] == pytest.approx(one["stats"][stat], rel=TOLERANCE), stat
    assert relative_diff(outcome["gradients"], one["gradients"]) < TOLERANCE
    assert relative_diff(outcome["weights"], one["weights"]) < TOLERANCE
    assert all(isinstance(p, DTensor) == sharded for p in learner.model.parameters())
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())


def one_rank_learner_step(model: CausalLM, trajectories, config: PPOConfig, learner_config: LearnerConfig) -> dict:
    learner = FSDPLearner(copy.deepcopy(model), config, pad_token_id=0, temperature=1.0, learner_config=learner_config)
    assert learner.sharded == (learner_config.one_rank_mode is OneRankMode.fsdp)
    return sharded_step(learner, RankShare(list(trajectories),
                                           trajectory_advantages(trajectories, config.advantage_norm.value)))


@pytest.mark.parametrize("name", ["balanced", "tiny_budget", "idle_rank_with_kl"])
def test_plain_one_rank_learner_equals_fsdp_one_rank_learner(one_rank_group, batch, name):
    """fp32 on CPU: the unwrapped one-rank learner's step (stats, clipped gradient, updated weights) equals the
    FSDP-wrapped one's to 1e-6, with several packs (gradients accumulated over packs) and a KL reference."""
    model, trajectories = batch
    config = configs()[name]
    outcomes = {mode: one_rank_learner_step(model, trajectories, config, LearnerConfig(one_rank_mode=mode))
                for mode in OneRankMode}
    plain, fsdp = outcomes[OneRankMode.plain], outcomes[OneRankMode.fsdp]
    for stat, value in fsdp["stats"].items():
        assert plain["stats"][stat] == pytest.approx(value, rel=1e-6, abs=1e-9), stat
    assert relative_diff(plain["gradients"], fsdp["gradients"]) < 1e-6
    assert relative_diff(plain["weights"], fsdp["weights"]) < 1e-6


def test_clipping_folded_into_fused_adamw_equals_a_clipping_pass(one_rank_group, batch, monkeypatch):
    """With a fused AdamW (CPU has one too) the plain learner clips through the optimizer's grad_scale; the
    weights equal those of a separate clipping pass."""

    def fused_optimizer(params, config):
        return torch.optim.AdamW(list(params), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 weight_decay=config.weight_decay, fused=True)

    monkeypatch.setattr(ppo_learner, "build_optimizer", fused_optimizer)
    model, trajectories = batch
    config = configs()["tiny_budget"]  # its gradient norm is above grad_clip: clipping changes the update
    outcomes = {folded: one_rank_learner_step(model, trajectories, config, LearnerConfig(fused_clip=folded))
                for folded in (True, False)}
    assert outcomes[True]["stats"]["grad_norm"] > config.grad_clip
    assert outcomes[True]["stats"] == outcomes[False]["stats"]
    assert relative_diff(outcomes[True]["weights"], outcomes[False]["weights"]) < 1e-6


@pytest.mark.parametrize("mode", list(OneRankMode))
def test_deferred_reads_give_the_same_step(one_rank_group, batch, mode):
    """Reading the stats and gradient norm once after the optimizer step (and no one-rank collectives) gives
    exactly the stats and weights of reading them before it, over several packs and a KL reference."""
    model, trajectories = batch
    config = configs()["idle_rank_with_kl"]
    outcomes = {deferred: one_rank_learner_step(model, trajectories, config,
                                                LearnerConfig(one_rank_mode=mode, defer_reads=deferred))
                for deferred in (True, False)}
    assert outcomes[True]["stats"] == outcomes[False]["stats"]
    assert list(outcomes[True]["stats"]) == list(outcomes[False]["stats"])
    for name, weight in outcomes[False]["weights"].items():
        assert np.array_equal(outcomes[True]["weights"][name], weight), name


def test_plain_one_rank_learner_autocasts_with_fp32_master_weights(one_rank_group, batch, monkeypatch):
    """The CUDA configuration of the plain learner (bf16 autocast over fp32 parameters), run on CPU: parameters
    and gradients stay fp32, the frozen reference is kept in bf16, and the step is the fp32 step to bf16
    rounding."""
    model, trajectories = batch
    config = configs()["idle_rank_with_kl"]
    fp32 = one_rank_learner_step(model, trajectories, config, LearnerConfig())
    monkeypatch.setattr(fsdp_learner, "plain_autocast_dtype", lambda device_type: torch.bfloat16)
    learner = FSDPLearner(copy.deepcopy(model), config, pad_token_id=0, temperature=1.0)
    assert learner.ppo.autocast_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in learner.ppo.reference.parameters())
    bf16 = sharded_step(learner, RankShare(list(trajectories), trajectory_advantages(trajectories, "group")))
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(gradient.dtype == np.float32 for gradient in bf16["gradients"].values())
    assert bf16["stats"]["loss"] == pytest.approx(fp32["stats"]["loss"], rel=0.05, abs=1e-3)
    gradient_diff = relative_diff(bf16["gradients"], fp32["gradients"])
    assert 0 < gradient_diff < 0.1, gradient_diff
    assert bf16["gradients"].keys() == fp32["gradients"].keys()


def test_warmup_factor_is_linear_then_constant():
    assert [warmup_factor(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
