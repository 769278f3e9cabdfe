"""FSDP2 learner ranks: `PPOLearner`'s decoupled-PPO step with the policy sharded over the default process group
(gloo on CPU, NCCL on GPU).

Every rank trains on its own share of the step's trajectories:
- advantages come with the trajectories, computed once over the whole step batch before it is split
  (`split_step_across_ranks`), so a group whose samples land on different ranks still gets its true group mean;
- each rank normalises its loss by the global output-token count and FSDP sums (does not average) the
  gradients over the ranks, so the M-rank gradient equals the one-rank gradient of the same batch;
- every rank runs the same number of forward/backward passes (FSDP's all-gathers and reduce-scatters are
  collective): a rank with fewer packs runs empty placeholder packs that carry no trained token.

A one-rank group has nothing to shard: by default (learner.one_rank_mode plain) it trains the module itself, whose
fp32 parameters are the master weights, with fp32 gradients and, on CUDA, bf16 compute under autocast. Without
a process group at all (torch.distributed not initialised, `group=None`) the learner is that one rank on its
own: the inline placement's learner, which shares its process (and GPU) with the engine.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from areal_async.checkpointing import load_learner_state, save_learner_state
from areal_async.config import LearnerConfig, Objective, OneRankMode, PPOConfig
from areal_async.model import CausalLM
from areal_async.packing import PackedBatch, balance_across_ranks, split_into_minibatches, split_into_packs
from areal_async.types import Trajectory
from learners.ppo_learner import (
    MAX_STAT, PPOLearner, agreement_stats, agreement_totals, combine_update_stats, read_stats,
)



@dataclass
class RankShare:
    """One rank's part of a training step: trajectories and their advantages (computed over the whole step)."""

    trajectories: list[Trajectory]
    advantages: list[float]


def split_step_across_ranks(trajectories: Sequence[Trajectory], advantages: Sequence[float],
                            num_ranks: int) -> list[RankShare]:
    """A token-balanced split of the step batch into `num_ranks` shares. Groups may be split over ranks: each
    sample keeps its advantage, computed against its whole group over the whole batch."""
    return [
        RankShare([trajectories[i] for i in indices], [advantages[i] for i in indices])
        for indices in balance_across_ranks([t.num_tokens for t in trajectories], num_ranks)
    ]


def mixed_precision_policy(device_type: str, compute_dtype: torch.dtype | None = None) -> MixedPrecisionPolicy:
    """Compute in `compute_dtype` (default: bf16 on GPU, fp32 on CPU) with fp32 gradient reduction; fp32
    compute casts nothing. The sharded master weights (what the optimizer updates) stay fp32 either way."""
    dtype = compute_dtype or plain_autocast_dtype(device_type) or torch.float32
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def checkpoint_activations(layer: torch.nn.Module) -> None:
    """Recompute `layer`'s activations in backward instead of storing them.

    Patches the instance's forward rather than wrapping the module, so parameter names (the published and
    exported names) stay unchanged; FSDP's hooks run around the patched forward, as around any forward.
    """
    layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def sum_gradients_over_ranks(model: torch.nn.Module) -> None:
    """Make every FSDP unit reduce gradients by a plain SUM over ranks instead of FSDP's default average.

    Divide factor 1 alone would turn the reduction into PreMulSum(1.0), which gloo lacks and NCCL handles
    badly in bf16; forcing SUM reductions keeps plain ReduceOp.SUM and skips the post-division by 1.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def shard_policy(
    model: CausalLM, mesh: DeviceMesh, activation_checkpointing: bool = False, compile_layers: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> CausalLM:
    """Shards `model` in place with FSDP2 over `mesh`: one unit per DecoderLayer, then the root (embeddings,
    final norm, lm_head), computing in `compute_dtype` (`mixed_precision_policy`). Gradients reduce by sum over
    ranks. `compile_layers` compiles each DecoderLayer in place (torch.compile; parameter names unchanged).
    Returns the same object, now an FSDPModule.

    On a one-rank mesh nothing is sharded, so the layers keep their gathered (bf16) parameters from forward to
    backward instead of casting and copying them again for backward (reshard_after_forward=False), and the
    gradients keep FSDP's default reduction, which on one rank is a plain copy (the sum over one rank; forcing
    a divide factor would add a division pass over every gradient)."""
    model.to(torch.float32)  # fp32 master weights; the mixed-precision policy casts for compute
    policy = mixed_precision_policy(mesh.device_type, compute_dtype)
    single_rank = mesh.size() == 1
    for layer in model.model.layers:
        if compile_layers:
            layer.compile()
        if activation_checkpointing:
            checkpoint_activations(layer)
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=not single_rank)
    # The root stays unsharded after forward: the logprob code reads lm_head.weight after hidden_states returns.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # The learner calls hidden_states, never forward: FSDP must all-gather around it too.
    register_fsdp_forward_method(model, "hidden_states")
    if not single_rank:
        sum_gradients_over_ranks(model)
    return model


def plain_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The compute dtype of the plain one-rank path: bf16 on CUDA (as FSDP's mixed-precision policy there),
    none elsewhere (fp32 throughout, as FSDP's CPU policy)."""
    return torch.bfloat16 if device_type == "cuda" else None


def plain_policy(model: CausalLM, activation_checkpointing: bool = False, compile_layers: bool = False) -> CausalLM:
    """`shard_policy` without FSDP, for a one-rank group: fp32 parameters (the master weights the optimizer
    updates), each DecoderLayer compiled and/or checkpointed in place as there. Returns the same object."""
    model.to(torch.float32)
    for layer in model.model.layers:
        if compile_layers:
            layer.compile()
        if activation_checkpointing:
            checkpoint_activations(layer)
    return model


def compiles_layers(config: PPOConfig, device: torch.device | str) -> bool:
    """ppo.compile_layers, whose default (null) is: on CUDA."""
    return torch.device(device).type == "cuda" if config.compile_layers is None else config.compile_layers


def reshard_all(model: torch.nn.Module) -> None:
    """Reshard every FSDP unit of `model` (a no-op for units already sharded)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group`; 1 when there is no process group at all (a learner on its own)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping multiplies the gradients by, given their global norm: min(1, max_norm / (norm + 1e-6))."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_gradients_(
    parameters: Sequence[torch.nn.Parameter], max_norm: float, device: torch.device,
    group: dist.ProcessGroup | None = None, scale: bool = True,
) -> torch.Tensor:
    """Clips the gradients of `parameters` (sharded or not) in place by their global L2 norm over all ranks and
    returns that norm (before clipping), the same on every rank. scale=False only computes the norm (the
    caller applies `clip_coefficient` itself).

    Works on the local shards: one multi-tensor norm, one all-reduce of the squared norm (with more than one
    rank), one multi-tensor scale. clip_grad_norm_ over DTensors computes the same but dispatches each
    multi-tensor op through DTensor's sharding propagation, host time during which the GPU idles."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if grads:
        squared = torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).square().sum()
    else:
        squared = torch.zeros((), dtype=torch.float32, device=device)
    if group_size(group) > 1:
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=group)
    norm = squared.sqrt()
    if grads and scale:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm))
    return norm


def all_reduce_floats(
    values: Sequence[float], op: dist.ReduceOp, device: torch.device, group: dist.ProcessGroup | None = None,
    one_rank_collective: bool = False,
) -> list[float]:
    """All-reduce a list of Python floats (same length on every rank of `group`) in fp64 on `device`. A
    one-rank group returns them as they are (the same floats: each is exact in fp64), without a collective
    unless `one_rank_collective` (and a process group exists)."""
    if group_size(group) == 1 and (not one_rank_collective or not dist.is_initialized()):
        return [float(value) for value in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def placeholder_trajectory(pad_token_id: int) -> Trajectory:
    """A one-token prompt without output: its pack runs the collectives of a pass and trains on nothing."""
    empty = np.zeros(0, dtype=np.int32)
    return Trajectory("", "", 0, np.array([pad_token_id], dtype=np.int32), empty, empty.astype(np.float32), empty,
                      0.0, "stop")


class FSDPLearner:
    """One learner rank. Composes a `PPOLearner` (objective, packing, logprob recomputation) whose policy (and
    frozen reference, if any) is sharded with FSDP2 over the ranks of `group` (on a one-rank group, see
    learner.one_rank_mode: by default not wrapped at all).

    Construct on every rank with the same initial `model` (on GPU: after torch.cuda.set_device(local rank),
    with `device` that GPU). `group`: the learner ranks' process group (default: the whole world, or, with no
    torch.distributed world, this learner on its own); the world may hold other processes too, such as rollout
    workers that only share the weight-sync group. compute_dtype: the dtype the forward and backward compute in,
    sharded (FSDP's mixed-precision policy) or not (the plain one-rank path's autocast) (default: bf16 on CUDA,
    fp32 elsewhere; float32 casts nothing). publish_dtype: the dtype of
    `policy_state` (what the engines hold; default: the parameters' fp32). learner_config: how it computes
    (default LearnerConfig()).
    """

    def __init__(
        self,
        model: CausalLM,
        config: PPOConfig,
        pad_token_id: int,
        temperature: float,
        device: str | torch.device = "cpu",
        version: int = 0,
        compile_layers: bool = False,
        group: dist.ProcessGroup | None = None,
        compute_dtype: torch.dtype | None = None,
        publish_dtype: torch.dtype | None = None,
        learner_config: LearnerConfig | None = None,
    ) -> None:
        self.learner_config = learner_config or LearnerConfig()
        self.publish_dtype = publish_dtype
        self.last_step_timings: dict[str, float] = {}
        if group is None and dist.is_initialized():
            group = dist.group.WORLD
        self.group = group
        one_rank_fsdp = self.learner_config.one_rank_mode is OneRankMode.fsdp and self.group is not None
        self.sharded = group_size(self.group) > 1 or one_rank_fsdp

        def place(ppo: PPOLearner) -> None:  # before PPOLearner builds its optimizer over the parameters
            if self.sharded:  # from where the weights were loaded: fully_shard moves each unit's shard to the GPU
                self.mesh = DeviceMesh.from_group(self.group, ppo.device.type)
                shard_policy(ppo.model, self.mesh, config.activation_checkpointing, compile_layers, compute_dtype)
                if ppo.reference is not None:
                    shard_policy(ppo.reference, self.mesh, compute_dtype=compute_dtype)
                return
            # The fp32 parameters stay the module's own (checkpoints and published weights see them as
            # they are); the forward passes run under autocast, which casts each weight for its matmul.
            plain_policy(ppo.model.to(ppo.device), config.activation_checkpointing, compile_layers)
            autocast = plain_autocast_dtype(ppo.device.type) if compute_dtype is None else compute_dtype
            ppo.autocast_dtype = None if autocast == torch.float32 else autocast
            if ppo.reference is not None:  # frozen: kept in the compute dtype, as FSDP would compute it
                ppo.reference.to(ppo.device, ppo.autocast_dtype or torch.float32)

        self.ppo = PPOLearner(model, config, pad_token_id, temperature, device, version, self.learner_config, place)
        self.optimizer = self.ppo.optimizer
        self.scheduler = self.ppo.scheduler

    def _all_reduce_floats(self, values: Sequence[float], op: dist.ReduceOp) -> list[float]:
        """`all_reduce_floats` over the learner group (on one rank a collective only without defer_reads)."""
        return all_reduce_floats(values, op, self.ppo.device, self.group,
                                 one_rank_collective=not self.learner_config.defer_reads)

    @property
    def model(self) -> CausalLM:
        return self.ppo.model

    @property
    def version(self) -> int:
        return self.ppo.version

    @version.setter
    def version(self, value: int) -> None:
        self.ppo.version = value

    @property
    def config(self) -> PPOConfig:
        return self.ppo.config

    def _reshard_roots(self) -> None:
        """The roots (and, on one rank, the layers) keep their parameters gathered after a forward without
        backward: shard them again so that parameters() are the sharded ones outside a step."""
        if not self.sharded:
            return
        reshard_all(self.ppo.model)
        if self.ppo.reference is not None:
            reshard_all(self.ppo.reference)

    def prepare(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> list[PackedBatch]:
        """This rank's packs with proximal (and reference) logprobs, padded with placeholder packs to the
        largest pack count of any rank.

        Each pack's trajectories go to PPOLearner.prepare on their own (they fit the budget, so it keeps them
        in one pack), which makes the number of forward passes equal on every rank.
        """
        budget = self.config.micro_batch_tokens
        packs = split_into_packs([t.num_tokens for t in trajectories], budget)
        (num_packs,) = self._all_reduce_floats([len(packs)], dist.ReduceOp.MAX)
        placeholder = ([placeholder_trajectory(self.ppo.pad_token_id)], [0.0])
        micro_batches = []
        for index in range(int(num_packs)):
            if index < len(packs):
                members = packs[index]
                share = ([trajectories[i] for i in members], [advantages[i] for i in members])
            else:
                share = placeholder
            micro_batches += self.ppo.prepare(*share)
        self._reshard_roots()
        return micro_batches

    def backward(self, micro_batches: Sequence[PackedBatch], read: bool = True) -> dict[str, float]:
        """Accumulates this rank's part of the gradient of the global token-mean loss; FSDP sums the parts
        over the ranks. Returns the step's stats over all ranks (token means; behaviour_weight_max: max);
        read=False: as 0-d fp64 device tensors, reduced over the ranks on the device, not yet read (see
        `read_stats`)."""
        local_tokens = sum(b.num_output_tokens for b in micro_batches)
        (global_tokens,) = self._all_reduce_floats([local_tokens], dist.ReduceOp.SUM)
        if read and not self.learner_config.defer_reads and self.group is not None:  # read, then reduce floats
            stats = self.ppo.backward(micro_batches, total_output_tokens=int(global_tokens))
            summed = sorted(name for name in stats if name != MAX_STAT)
            reduced = dict(zip(summed, self._all_reduce_floats([stats[name] for name in summed], dist.ReduceOp.SUM)))
            if MAX_STAT in stats:
                (reduced[MAX_STAT],) = self._all_reduce_floats([stats[MAX_STAT]], dist.ReduceOp.MAX)
            return reduced
        # The same fp64 values reduced on the device by the same collectives (none on one rank), unread.
        stats = self.ppo.backward(micro_batches, total_output_tokens=int(global_tokens), read=False)
        summed = sorted(name for name in stats if name != MAX_STAT)
        reduced: dict[str, torch.Tensor] = {}
        if summed:
            values = torch.stack([stats[name] for name in summed])
            if group_size(self.group) > 1:
                dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
            reduced = dict(zip(summed, values.unbind()))
        if MAX_STAT in stats:
            value = stats[MAX_STAT].reshape(1)
            if group_size(self.group) > 1:
                dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
            reduced[MAX_STAT] = value[0]
        return read_stats(reduced) if read else reduced

    def optimizer_step(self, read: bool = True) -> float | torch.Tensor:
        """Clips the gradient by its global norm (over all shards), steps AdamW and the learning-rate schedule.
        Returns the norm before clipping (read=False: as a 0-d device tensor, not yet read)."""
        clip = self.config.grad_clip
        fold = self.learner_config.fused_clip and not self.sharded and bool(self.optimizer.defaults.get("fused"))
        norm = clip_gradients_(list(self.model.parameters()), clip, self.ppo.device, self.group, scale=not fold)
        if fold:
            # The fused kernel divides every gradient by grad_scale (the input GradScaler unscales through):
            # dividing by 1 / coefficient clips inside the update, saving a read and write of every gradient.
            self.optimizer.grad_scale = clip_coefficient(norm, clip).reciprocal()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
        else:
            self.optimizer.step()
        self.scheduler.step()
        return float(norm) if read else norm

    def update(self, micro_batches: Sequence[PackedBatch]) -> dict[str, float]:
        """One optimizer update on `micro_batches` (every rank calls it together): zeroes the gradients,
        accumulates them (`backward`), clips and steps (`optimizer_step`). Returns the stats over all ranks
        with the learning rate this update used and the gradient norm before clipping, read from the device
        once, after the optimizer step is queued (with learner.defer_reads)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.learner_config.defer_reads:
            stats = self.backward(micro_batches)
            stats["lr"] = self.scheduler.get_last_lr()[0]
            stats["grad_norm"] = self.optimizer_step()
            return stats
        unread = self.backward(micro_batches, read=False)
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        unread["grad_norm"] = self.optimizer_step(read=False)
        stats = read_stats(unread)
        grad_norm = stats.pop("grad_norm")
        return stats | {"lr": lr, "grad_norm": grad_norm}

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> dict[str, float]:
        """One training step over this rank's share; every rank calls it together. Produces version + 1; the
        returned stats are over all ranks and identical on each. The share is shuffled and cut into
        minibatches (as many on every rank: minibatches_per_step, at most one per trajectory of the whole
        batch), each packed on its own and trained in one optimizer update over all ranks; every minibatch's
        proximal logprobs are taken before the first update.
        `last_step_timings` then holds the seconds of the proximal recomputation (`prepare_s`) and of the
        updates (`update_s`).

        advantages: one per trajectory, computed over the whole step batch."""
        started = time.perf_counter()
        (batch_size,) = self._all_reduce_floats([len(trajectories)], dist.ReduceOp.SUM)
        # as many minibatches on every rank (a rank whose share is short trains placeholders in some)
        num_parts = max(1, min(self.config.minibatches_per_step, int(batch_size)))
        parts = split_into_minibatches(len(trajectories), num_parts, seed=self.version)
        minibatches = [self.prepare([trajectories[i] for i in part], [advantages[i] for i in part]) for part in parts]
        agreement = {}
        if self.config.objective is Objective.decoupled:
            totals = read_stats(agreement_totals([b for part in minibatches for b in part], self.version))
            total, tokens = self._all_reduce_floats([totals["sum"], totals["tokens"]], dist.ReduceOp.SUM)
            (largest,) = self._all_reduce_floats([totals["max"]], dist.ReduceOp.MAX)
            agreement = agreement_stats(total, largest, tokens)
        prepared = time.perf_counter()
        stats = combine_update_stats([self.update(micro_batches) for micro_batches in minibatches]) | agreement
        # generation and publication never read them: on one GPU their memory goes to the KV pool between steps
        self.optimizer.zero_grad(set_to_none=True)
        self.ppo.version += 1
        (stats["trained_tokens"],) = self._all_reduce_floats(  # prompt + output, placeholders excluded
            [sum(t.num_tokens for t in trajectories)], dist.ReduceOp.SUM
        )
        # the last update's stats were read from the device, so its work has finished
        self.last_step_timings = {"prepare_s": prepared - started, "update_s": time.perf_counter() - prepared}
        return stats

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The full weights in `publish_dtype` (what the engines hold), on rank 0; a collective."""
        return self.full_state_dict(self.publish_dtype)

    def save_state(self, staging: Path) -> None:
        """This rank's policy, optimizer and schedule into a run checkpoint's staging folder (every rank)."""
        save_learner_state(staging, self, self.group)

    def load_state(self, path: Path) -> None:
        load_learner_state(path, self, self.group)

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full policy weights, named as the model's parameters, in `dtype` (default: the parameters'
        fp32), on rank 0 (an empty dict elsewhere): what the weight publisher and the HF export need. A
        collective: every rank must call it."""
        rank = dist.get_rank(self.group) if self.group is not None else 0
        state = {}
        for name, param in self.model.named_parameters():
            # all-gathered and cast one parameter at a time: besides the result, the peak is one full fp32
            # tensor (unsharded: the parameter itself)
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if rank == 0:
                state[name] = full.detach() if dtype is None else full.detach().to(dtype)
            del full
        return state
