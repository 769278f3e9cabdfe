"""Where a run's processes go and what every GPU holds, computed from the config alone (`areal-async plan`).

Layout (`layout`). A Ray run (cluster.placement=ray) spans `cluster.nodes` nodes of `cluster.gpus_per_node` GPUs,
one GPU per learner rank and per rollout worker, and every node gets the same share of each: its learner ranks
on its first GPUs (consecutive ranks, so the FSDP ranks of a node are neighbours), then its rollout workers. The
driver (the trainer's own process, on the node the run starts from: node 0) keeps a built-in engine for held-out
evaluation and the HF export on `device`: Ray does not count it, so it shares that GPU with the actor placed there.
The replay-queue shards hold groups in host memory; the plan spreads them over the nodes, shard k on node
k mod nodes. Ray places the actors by their resources: this is the layout the config asks for, not pinned.

Memory (areal_async/planning/memory_plan.py). Every process on a GPU counts its peak: a learner rank its share of the
policy state, its activations and, on rank 0, the publisher's buffers; an engine its weights and its KV pool
(`engine.kv_memory_gib`, or without a budget `engine.max_slots` sequences of the stage's longest request); each
process its own reserve. The sequences an engine decodes at once are planned from the tokens a sequence is
expected to hold in flight (its prompt and `engine.expected_length_fraction` of max_new_tokens). A plan fits when every GPU's sum is within `cluster.gpu_memory_gib`; one that does
not fit names the GPU, its parts and what would make it fit.

Sizes are bytes unless a name says GiB; a sequence's length is prompt + new tokens.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from areal_async.config import EngineKind, ModelConfig, ModelShape, Placement, TrainConfig
from areal_async.planning.memory_plan import (
    GIB,
    MemoryPlan,
    Part,
    Phase,
    element_size,
    engine_parts,
    engine_sequences,
    expected_sequence_tokens,
    learner_rank_parts,
    parameter_count,
    peak_bytes,
    plan_one_gpu,
    pool_blocks,
)
from areal_async.model.checkpoint import load_config
from areal_async.model.paged_cache import blocks_for, kv_block_bytes
from areal_async.model.decoder import DecoderConfig
from areal_async.model.shapes import known_shape
from areal_async.weight_sync import DEFAULT_BUCKET_BYTES

# Learner ranks compute in bf16 on CUDA (learners/fsdp_learner.py's mixed-precision policy).
COMPUTE_ELEMENT_SIZE = 2


class Role(enum.Enum):
    learner_rank = "learner rank"
    rollout_worker = "rollout worker"
    driver = "driver engine"  # the trainer's evaluation/export engine
    inline = "engine and learner"  # cluster.placement=inline: one process


@dataclass(frozen=True)
class Seat:
    """Process `index` of `role` on GPU `gpu` (0 .. gpus_per_node - 1) of node `node`."""

    role: Role
    index: int
    node: int
    gpu: int


@dataclass(frozen=True)
class ShardSeat:
    """Replay-queue shard `index` in the host memory of node `node`: up to `capacity` groups, `host_bytes` when
    every group is as long as the stage allows."""

    index: int
    node: int
    capacity: int
    host_bytes: int


@dataclass(frozen=True)
class Process:
    """A process's parts of its GPU's memory (bytes)."""

    seat: Seat
    parts: tuple[Part, ...]

    @property
    def peak(self) -> int:
        return peak_bytes(self.parts)


@dataclass(frozen=True)
class GpuBudget:
    """GPU `gpu` of node `node` (`total` bytes) and the processes on it."""

    node: int
    gpu: int
    total: int
    processes: tuple[Process, ...]

    @property
    def used(self) -> int:
        return sum(process.peak for process in self.processes)

    @property
    def fits(self) -> bool:
        return self.used <= self.total


@dataclass
class Plan:
    """The placement and memory of a run. `failures` is empty when it fits."""

    header: list[str]
    seats: list[Seat] = field(default_factory=list)
    shards: list[ShardSeat] = field(default_factory=list)
    gpus: list[GpuBudget] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def fits(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        """The report `areal-async plan` prints."""
        lines = list(self.header)
        nodes = sorted({seat.node for seat in self.seats})
        if nodes:
            ray = any(seat.role is not Role.inline for seat in self.seats)
            lines.append("placement (learner ranks on each node's first GPUs; Ray assigns the physical GPUs):" if ray
                         else "placement:")
            lines += [f"  node {node}: {describe_node(self.seats, node)}" for node in nodes]
        if self.shards:
            shard, nodes = self.shards[0], len({seat.node for seat in self.seats} or {0})
            lines.append(f"replay queue: {len(self.shards)} shard{'s' if len(self.shards) > 1 else ''} of "
                         f"{shard.capacity:,} groups in host memory, up to {shard.host_bytes / GIB:.2f} GiB each; "
                         + ("on node 0" if nodes == 1 else f"shard k on node k mod {nodes}"))
        if self.gpus:
            lines.append(f"memory per GPU (GiB of {self.gpus[0].total / GIB:.2f}):")
            for group in group_budgets(self.gpus):
                lines += describe_budget_group(group)
        lines += self.failures or [self.summary]
        return "\n".join(line for line in lines if line)


def ranges(indices: Sequence[int]) -> str:
    """'0-5, 8, 10-11' for [0, 1, 2, 3, 4, 5, 8, 10, 11]."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _plural(role: Role, count: int) -> str:
    return role.value + ("s" if count > 1 and role is not Role.inline else "")


def describe_node(seats: Sequence[Seat], node: int) -> str:
    """One node's line: its GPUs by role, e.g. 'GPUs 0-1: learner ranks 0-1; GPUs 2-7: rollout workers 0-5'."""
    parts = []
    for role in (Role.learner_rank, Role.rollout_worker, Role.inline):
        mine = [seat for seat in seats if seat.node == node and seat.role is role]
        if mine:
            who = role.value if role is Role.inline else f"{_plural(role, len(mine))} {ranges([s.index for s in mine])}"
            parts.append(f"GPU{'s' if len(mine) > 1 else ''} {ranges([seat.gpu for seat in mine])}: {who}")
    line = "; ".join(parts)
    driver = next((seat for seat in seats if seat.node == node and seat.role is Role.driver), None)
    return line if driver is None else f"{line} (+ the driver's engine on GPU {driver.gpu})"


def _signature(budget: GpuBudget) -> tuple:
    return tuple((process.seat.role, process.parts) for process in budget.processes)


def group_budgets(gpus: Sequence[GpuBudget]) -> list[list[GpuBudget]]:
    """GPUs whose processes have the same roles and parts, learner ranks' first."""
    groups: dict[tuple, list[GpuBudget]] = {}
    for budget in gpus:
        groups.setdefault(_signature(budget), []).append(budget)
    roles = list(Role)  # learner ranks first, then rollout workers
    return sorted(groups.values(), key=lambda group: min((roles.index(p.seat.role), p.seat.index)
                                                          for p in group[0].processes))


def budget_label(group: Sequence[GpuBudget]) -> str:
    """'learner rank 0 + driver engine (node 0 GPU 0)' or 'rollout workers 0-95 (96 GPUs, each)'."""
    first = group[0]
    names = []
    for position, process in enumerate(first.processes):
        indices = [budget.processes[position].seat.index for budget in group]
        role = process.seat.role
        names.append(role.value if role in (Role.driver, Role.inline) else
                     f"{_plural(role, len(indices))} {ranges(indices)}")
    where = f"node {first.node} GPU {first.gpu}" if len(group) == 1 else f"{len(group)} GPUs, each"
    return f"{' + '.join(names)} ({where})"


def describe_budget_group(group: Sequence[GpuBudget]) -> list[str]:
    """The report's lines for GPUs with the same processes: the label and sum (GiB), each process's peak when
    several share the GPU, every part with its phase."""
    budget = group[0]
    lines = [f"  {budget_label(group)}: {budget.used / GIB:.2f}{'' if budget.fits else '  DOES NOT FIT'}"]
    for process in budget.processes:
        if len(budget.processes) > 1:
            lines.append(f"    {process.seat.role.value}: {process.peak / GIB:.2f}")
        for part in process.parts:
            phase = "" if part.phase is Phase.always else f" [{part.phase.value}]"
            lines.append(f"      {part.name + phase:<78} {part.size / GIB:7.2f}")
    return lines


def layout(nodes: int, gpus_per_node: int, learner_ranks: int, rollout_workers: int) -> list[Seat]:
    """One seat per learner rank and rollout worker: on every node, its share of the ranks on the first GPUs,
    then its share of the workers. Raises ValueError, naming the config keys, when the counts do not divide
    over the nodes or a node has too few GPUs."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"cluster.nodes={nodes} and cluster.gpus_per_node={gpus_per_node} must be at least 1")
    for key, count in (("num_learner_ranks", learner_ranks), ("num_rollout_workers", rollout_workers)):
        if count < 1 or count % nodes:
            raise ValueError(f"cluster.{key}={count} does not split evenly over cluster.nodes={nodes} "
                             "(every node gets the same share, at least one)")
    ranks_per_node, workers_per_node = learner_ranks // nodes, rollout_workers // nodes
    if ranks_per_node + workers_per_node > gpus_per_node:
        raise ValueError(f"a node needs {ranks_per_node} + {workers_per_node} GPUs (cluster.num_learner_ranks="
                         f"{learner_ranks} and cluster.num_rollout_workers={rollout_workers} over cluster.nodes="
                         f"{nodes}) but has cluster.gpus_per_node={gpus_per_node}")
    seats = []
    for node in range(nodes):
        seats += [Seat(Role.learner_rank, node * ranks_per_node + i, node, i) for i in range(ranks_per_node)]
        seats += [Seat(Role.rollout_worker, node * workers_per_node + i, node, ranks_per_node + i)
                  for i in range(workers_per_node)]
    return seats


def group_bytes(group_size: int, prompt_tokens: int, new_tokens: int) -> int:
    """Host bytes of one group of `group_size` trajectories at the longest: per trajectory int32 prompt and
    output tokens, fp32 behaviour logprobs and int32 versions of the output tokens."""
    return group_size * (4 * prompt_tokens + 12 * new_tokens)


def place_shards(num_shards: int, nodes: int, capacity: int, bytes_per_group: int) -> list[ShardSeat]:
    """Shard k on node k mod `nodes`, each holding up to `capacity` groups of `bytes_per_group`."""
    return [ShardSeat(index, index % nodes, capacity, capacity * bytes_per_group) for index in range(num_shards)]


def model_shape(model: ModelConfig, warm_start: Path) -> tuple[DecoderConfig, str]:
    """The model's shape and where it came from: model.path's config.json, else the built-in `model.shape`, else
    (model.path null) the config.json of `warm_start`, the checkpoint such a run trains. Raises ValueError when
    model.path holds no config.json and model.shape is unset."""
    path = Path(model.path) if model.path else None
    if path is not None and (path / "config.json").is_file():
        return load_config(path), str(path / "config.json")
    if model.shape is not None:
        where = "model.path is null" if path is None else f"no config.json in {path}"
        return known_shape(model.shape), f"built-in shape {model.shape.value} ({where})"
    if path is None:
        return load_config(warm_start), str(warm_start / "config.json")
    raise ValueError(f"model.path={path} holds no config.json and model.shape is unset: point model.path at a "
                     f"Hugging Face folder or set model.shape (one of {', '.join(s.value for s in ModelShape)})")


def _driver_evaluates(config: TrainConfig) -> bool:
    """Whether the driver's engine generates (held-out accuracy or benchmarks) and so allocates a KV cache."""
    heldout = config.data.num_heldout > 0 or config.data.heldout_path is not None
    return (config.eval.num_samples > 0 and heldout) or bool(config.eval.benchmarks)


def _gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def kv_advice(budget: GpuBudget, shape: DecoderConfig, config: TrainConfig, prompt_tokens: int,
              dtype: torch.dtype) -> str:
    """What would make a GPU with engines fit: the KV budget left per engine and the sequences it carries."""
    engine, max_new = config.engine, config.generation.max_new_tokens
    longest = prompt_tokens + max_new
    kv_parts = [part for process in budget.processes for part in process.parts if part.kv_cache]
    engines = sum(1 for process in budget.processes if any(part.kv_cache for part in process.parts))
    needed = sum(part.size for part in kv_parts)
    left = budget.total - (budget.used - needed)
    share = max(0, left // max(1, engines))
    blocks = share // kv_block_bytes(shape, engine.kv_block_size, dtype)
    sequences = engine_sequences(blocks, engine.max_slots, engine.kv_block_size, prompt_tokens, max_new,
                                 engine.expected_length_fraction)
    who = "" if engines < 2 else f" ({engines} engines share this GPU: {_gib(share)} each)"
    if sequences < 1:
        return (f"    the engine KV pool needs {_gib(needed)} but {_gib(max(0, left))} is left for it{who}, less than "
                f"one sequence of {longest:,} tokens: lower generation.max_new_tokens")
    expected = expected_sequence_tokens(prompt_tokens, max_new, engine.expected_length_fraction)
    return (f"    the engine KV pool needs {_gib(needed)} but {_gib(left)} is left for it{who}: about {sequences} "
            f"sequences of {expected:,} tokens expected fit at once (set engine.kv_memory_gib="
            f"{math.floor(share / GIB * 10) / 10:g}), or lower generation.max_new_tokens")


def fit_advice(budget: GpuBudget, gpus: Sequence[GpuBudget], shape: DecoderConfig, config: TrainConfig,
               prompt_tokens: int, dtype: torch.dtype) -> str:
    """What would make `budget`'s GPU fit: a smaller KV cache, the driver's engine on a GPU with room for it, or
    (a learner's GPU) its largest parts named."""
    if any(part.kv_cache for process in budget.processes for part in process.parts):
        return kv_advice(budget, shape, config, prompt_tokens, dtype)
    driver = next((p for p in budget.processes if p.seat.role is Role.driver), None)
    if driver is not None and len(budget.processes) > 1:
        room = [b for b in gpus if b.node == 0 and b is not budget and b.used + driver.peak <= b.total]
        if room:
            best = min(room, key=lambda b: b.used)
            return (f"    the driver's engine ({_gib(driver.peak)}) shares this GPU: device=cuda:{best.gpu} puts it "
                    f"beside {' + '.join(p.seat.role.value for p in best.processes)} on GPU {best.gpu} of node 0, "
                    f"which then holds {_gib(best.used + driver.peak)}")
    parts = [part for process in budget.processes for part in process.parts]
    largest = ", ".join(f"{part.name} {_gib(part.size)}" for part in sorted(parts, key=lambda p: -p.size)[:2])
    training, publishing = (sum(p.size for p in parts if p.phase is phase) for phase in (Phase.training, Phase.publishing))
    if publishing > training:  # rank 0 while it publishes: more ranks or smaller micro-batches do not help
        return (f"    largest parts: {largest}; learner rank 0's publication buffers hold the full weights and do "
                "not shrink with more ranks: a GPU with more memory (cluster.gpu_memory_gib) or a smaller model")
    return (f"    largest parts: {largest}; lower ppo.micro_batch_tokens, set ppo.activation_checkpointing=true or add "
            "learner ranks (cluster.num_learner_ranks)")


def plan_run(config: TrainConfig, shape: DecoderConfig, shape_source: str, prompt_tokens: int) -> Plan:
    """The plan of `config` for a model of `shape` (named by `shape_source` in the report), with prompts of up to
    `prompt_tokens` tokens. Raises ValueError for a config the plan cannot lay out (naming the key)."""
    cluster, generation = config.cluster, config.generation
    if prompt_tokens < 0:
        raise ValueError(f"prompt tokens must be >= 0, got {prompt_tokens}")
    longest = prompt_tokens + generation.max_new_tokens
    eval_longest = prompt_tokens + (config.eval.max_gen_tokens or generation.max_new_tokens)
    dtype = getattr(torch, config.model.dtype)
    total = int(cluster.gpu_memory_gib * GIB)
    header = [
        f"model: {shape_source}: {parameter_count(shape):,} parameters, {config.model.dtype}",
        f"sequences: up to {prompt_tokens:,} prompt + {generation.max_new_tokens:,} new tokens = {longest:,}",
    ]
    cuda = torch.device(config.device).type == "cuda"
    if cluster.placement is Placement.inline:
        header.insert(0, f"cluster.placement=inline: one process, device={config.device}")
        if not cuda:
            return Plan(header, summary="runs on the CPU: no GPU memory to plan")
        return _inline_plan(config, shape, header, total, prompt_tokens)
    header.insert(0, f"cluster.placement=ray: {cluster.nodes} node{'s' if cluster.nodes > 1 else ''} x "
                     f"{cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gib:g} GiB (cluster.gpu_memory_gib)")
    if not cuda:
        ranks, workers = cluster.num_learner_ranks, cluster.num_rollout_workers
        return Plan(header, summary=f"device={config.device}: {ranks} {_plural(Role.learner_rank, ranks)} and {workers} "
                                    f"{_plural(Role.rollout_worker, workers)} on CPUs, no GPU memory to plan")
    if config.rollout.engine is not EngineKind.torch:
        raise ValueError(f"rollout.engine={config.rollout.engine.value}: the plan budgets the built-in engine "
                         "(rollout.engine=torch); vLLM sizes its KV cache itself")
    for key, value in (("gpus_per_learner_rank", cluster.gpus_per_learner_rank),
                       ("gpus_per_rollout_worker", cluster.gpus_per_rollout_worker)):
        if value != 1:
            raise ValueError(f"cluster.{key}={value:g}: the plan places one whole GPU per learner rank and "
                             "rollout worker (set it to 1)")
    seats = layout(cluster.nodes, cluster.gpus_per_node, cluster.num_learner_ranks, cluster.num_rollout_workers)
    driver_gpu = torch.device(config.device).index or 0
    if driver_gpu >= cluster.gpus_per_node:
        raise ValueError(f"device={config.device}: node 0 has only cluster.gpus_per_node={cluster.gpus_per_node} GPUs")
    seats.append(Seat(Role.driver, 0, 0, driver_gpu))

    engine = config.engine
    budget = None if engine.kv_memory_gib is None else int(engine.kv_memory_gib * GIB)
    block_bytes = kv_block_bytes(shape, engine.kv_block_size, dtype)
    blocks = pool_blocks(budget, block_bytes, engine.max_slots, longest, engine.kv_block_size)
    eval_blocks = pool_blocks(budget, block_bytes, engine.max_slots, eval_longest, engine.kv_block_size)
    sequences = engine_sequences(blocks, engine.max_slots, engine.kv_block_size, prompt_tokens,
                                 generation.max_new_tokens, engine.expected_length_fraction)
    processes: dict[tuple[int, int], list[Process]] = {}
    for seat in seats:
        if seat.role is Role.learner_rank:
            parts = learner_rank_parts(
                shape, cluster.num_learner_ranks, seat.index, total, COMPUTE_ELEMENT_SIZE, dtype,
                config.ppo.micro_batch_tokens, longest, config.ppo.activation_checkpointing, config.ppo.kl_coef > 0)
        elif seat.role is Role.rollout_worker:
            parts = engine_parts(shape, dtype, total, blocks, engine.kv_block_size,
                                 receiver_bucket_bytes=min(DEFAULT_BUCKET_BYTES, parameter_count(shape) * dtype.itemsize))
        else:
            parts = engine_parts(shape, dtype, total, eval_blocks if _driver_evaluates(config) else 0,
                                 engine.kv_block_size)
        processes.setdefault((seat.node, seat.gpu), []).append(Process(seat, tuple(parts)))
    gpus = [GpuBudget(node, gpu, total, tuple(procs)) for (node, gpu), procs in sorted(processes.items())]
    shards = place_shards(config.rollout.num_queue_shards, cluster.nodes, config.rollout.queue_capacity_per_shard,
                          group_bytes(generation.group_size, prompt_tokens, generation.max_new_tokens))

    failures = []
    if longest > shape.max_position_embeddings:
        failures.append(f"does not fit: sequences of {longest:,} tokens exceed the model's "
                        f"max_position_embeddings={shape.max_position_embeddings:,}")
    if sequences < 1:
        failures.append(f"does not fit: engine.kv_memory_gib={engine.kv_memory_gib:g} holds no sequence of "
                        f"{longest:,} tokens ({blocks_for(longest, engine.kv_block_size):,} blocks of "
                        f"{_gib(block_bytes)} each)")
    for group in group_budgets(gpus):
        first = group[0]
        if first.fits:
            continue
        failures.append(f"does not fit: {budget_label(group)} needs {_gib(first.used)} of cluster.gpu_memory_gib="
                        f"{cluster.gpu_memory_gib:g}")
        failures.append(fit_advice(first, gpus, shape, config, prompt_tokens, dtype))
    fullest = max(gpus, key=lambda b: b.used)
    expected = expected_sequence_tokens(prompt_tokens, generation.max_new_tokens, engine.expected_length_fraction)
    summary = (f"fits: the fullest GPU, node {fullest.node} GPU {fullest.gpu}, holds {_gib(fullest.used)} of "
               f"{_gib(total)}; each rollout worker decodes {sequences} sequences at once ({expected:,} tokens "
               f"expected each, up to {longest:,}) from a KV pool of {blocks - 1:,} blocks")
    return Plan(header, seats, shards, gpus, failures, summary)


def inline_gpu_plan(config: TrainConfig, shape: DecoderConfig, total_bytes: int, prompt_tokens: int) -> MemoryPlan:
    """memory_plan.plan_one_gpu for an inline run of `config` on a GPU of `total_bytes` bytes, prompts of up to
    `prompt_tokens` tokens: what the trainer checks at start, `areal-async plan` reports and the simulator's
    engine holds (its KV pool, engine.kv_memory_gib or what the rest leaves). Raises InputError when it does not
    fit."""
    dtype = getattr(torch, config.model.dtype)
    engine = config.engine
    return plan_one_gpu(shape, total_bytes, dtype, element_size(dtype), config.ppo.micro_batch_tokens, prompt_tokens,
                        config.generation.max_new_tokens, engine.kv_memory_gib, engine.kv_block_size,
                        engine.expected_length_fraction, engine.max_slots, config.ppo.activation_checkpointing,
                        reference_model=config.ppo.kl_coef > 0, prefill_tokens=engine.prefill_tokens)


def _inline_plan(config: TrainConfig, shape: DecoderConfig, header: list[str], total: int, prompt_tokens: int) -> Plan:
    """One GPU holding the engine and the learner (memory_plan.plan_one_gpu, as the trainer checks at start)."""
    seat = Seat(Role.inline, 0, 0, torch.device(config.device).index or 0)
    try:
        one = inline_gpu_plan(config, shape, total, prompt_tokens)
    except ValueError as error:
        return Plan(header, [seat], failures=[f"does not fit: {error}"])
    gpu = GpuBudget(0, seat.gpu, total, (Process(seat, one.parts()),))
    return Plan(header, [seat], gpus=[gpu], summary=f"fits: the engine decodes {one.sequences} sequences at once "
                                                     f"({one.expected_sequence:,} tokens expected each, up to "
                                                     f"{one.longest_sequence:,}) from a KV pool of "
                                                     f"{one.blocks - 1:,} blocks; the learner trains micro-batches "
                                                     f"of {one.micro_batch_tokens:,} tokens while the pool is released")
