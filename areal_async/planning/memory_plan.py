"""The memory budget of a run with the engine and the learner on one GPU, shared in time.

Both live in one process and take turns: generation, then training, then the weight publication. What every
phase holds: the engine's weights (in the generation dtype), the learner's fp32 master weights and AdamW's two
fp32 moments (12 bytes per parameter, plus a frozen reference in the compute dtype when the KL term is on), the
weight publisher's bits of this and the previous version (two copies of the engine's weights) and a reserve for
the CUDA context, workspaces and fragmentation. On top of that each phase holds its own working memory:
- generation: the engine's KV pool and its working memory (a prefill forward of `engine.prefill_tokens` tokens,
  the decode step's logits);
- training (the KV pool released, areal_async/run/trainer.py): fp32 gradients and the compute-dtype weight copies
  autocast keeps (6 bytes per parameter), the activations of one micro-batch (of the longest sequence when it
  exceeds the micro-batch: such a sequence gets a pack of its own) and the LM head's fp32 gradient accumulator;
- publication: one cast of the full weights, and the receiver's and the checksums' scratch: three buckets of the
  publisher's layout (fitted: 0.47 GiB beyond the cast with 256 MiB buckets on the 1.5B shape).
The gradients are dropped at the end of each training step, so generation never holds them.

The KV pool is set (`engine.kv_memory_gib`) or, unset, what the generation phase leaves. It is a number of fixed-size
blocks that sequences take as they grow (areal_async/model/paged_cache.py), so the sequences it carries at once are
planned from the tokens a sequence is expected to hold in flight (its prompt and `engine.expected_length_fraction`
of max_new_tokens), not from the longest request; it must still hold one sequence of the longest request. The
micro-batch is `ppo.micro_batch_tokens` or, where the training phase does not fit the card with it, the largest
multiple of 1,024 tokens below it that does (the gradient does not depend on it). A run that cannot fit fails at
start with the numbers.

Activation memory per token of a pass is estimated from the layer shapes: 1.3 x (10 x hidden + 2 x intermediate)
elements of the compute dtype per layer, fitted to the PPO step of the one-GPU learner on the 1.5B shape (one H100,
2026-12-06, benchmarks/NOTES.md: 79.5 and 82.4 KB per token and layer at micro-batches of 16,384 and 8,192 tokens,
beyond the autocast copies, the head's gradient and the kept logits), rounded up. With activation checkpointing one
layer's worth plus the layer inputs are kept.

The parts of a Ray run's GPUs (`learner_rank_parts`, `engine_parts`; areal_async/planning/placement.py places them) follow
the same accounting, per process: an FSDP rank holds 1/ranks of the 16 bytes per parameter, the weights it
gathers for the layers it computes, its activations, and on rank 0 the publisher's buffers; an engine holds its
weights and its KV cache.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from areal_async.errors import InputError
from areal_async.model.decoder import DecoderConfig
from areal_async.model.paged_cache import blocks_for, kv_block_bytes
from areal_async.weight_sync.layout import DEFAULT_BUCKET_BYTES

GIB = 2**30
# The CUDA context, cuBLAS/cuDNN workspaces, compiled kernels and allocator fragmentation.
RESERVE_FRACTION = 0.04
RESERVE_MIN_BYTES = 3 * GIB
# activations kept per token and layer, over the layer's main tensors (10 x hidden + 2 x intermediate): fitted
ACTIVATION_FACTOR = 1.3


def layer_parameter_count(config: DecoderConfig) -> int:
    """Parameters of one decoder layer (attention with its biases, MLP, two norms)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    if config.attention_bias:  # q/k/v biases (Qwen2)
        attention += head_dim * (config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * hidden * config.intermediate_size
    return attention + mlp + 2 * hidden


def root_parameter_count(config: DecoderConfig) -> int:
    """Parameters outside the layers: embeddings, LM head (unless tied) and the final norm."""
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size


def parameter_count(config: DecoderConfig) -> int:
    """Parameters of the decoder `config` describes (embeddings and LM head included)."""
    return config.num_hidden_layers * layer_parameter_count(config) + root_parameter_count(config)


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


def reserve_bytes(total_bytes: int) -> int:
    """What one process on a GPU of `total_bytes` keeps beyond its tensors: CUDA context, cuBLAS/cuDNN
    workspaces, compiled kernels, allocator fragmentation."""
    return max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * total_bytes))


def pool_blocks(kv_memory_bytes: int | None, block_bytes: int, slots: int, longest_sequence: int,
                block_size: int) -> int:
    """Blocks of the built-in engine's KV pool, the null block included: what `kv_memory_bytes` holds, or (None:
    no budget) enough for `slots` sequences of `longest_sequence` tokens (TorchEngine.pool_blocks)."""
    if kv_memory_bytes is None:
        return slots * blocks_for(longest_sequence, block_size) + 1
    return kv_memory_bytes // block_bytes


def expected_sequence_tokens(prompt_tokens: int, max_new_tokens: int, fraction: float) -> int:
    """Tokens a sequence in flight is planned to hold: its prompt and `fraction` of its token limit."""
    return prompt_tokens + math.ceil(fraction * max_new_tokens)


def engine_sequences(blocks: int, max_slots: int, block_size: int, prompt_tokens: int, max_new_tokens: int,
                     fraction: float) -> int:
    """Sequences the built-in engine is planned to decode at once with a pool of `blocks` blocks (the null block
    included): max_slots, or fewer when the pool holds fewer sequences of the expected length
    (`expected_sequence_tokens`); 0 when it cannot hold one sequence of the longest request."""
    usable = blocks - 1
    if usable < blocks_for(prompt_tokens + max_new_tokens, block_size):
        return 0
    expected = blocks_for(expected_sequence_tokens(prompt_tokens, max_new_tokens, fraction), block_size)
    return int(min(max_slots, usable // expected))


def activation_bytes(config: DecoderConfig, tokens: int, element_size: int, checkpointing: bool,
                     kept_logits_bytes: int) -> int:
    """An estimate of the activations one forward/backward pass over `tokens` packed tokens keeps."""
    per_layer_token = int(ACTIVATION_FACTOR * (10 * config.hidden_size + 2 * config.intermediate_size)) * element_size
    if checkpointing:
        layers = tokens * (config.num_hidden_layers * config.hidden_size * element_size + per_layer_token)
    else:
        layers = tokens * config.num_hidden_layers * per_layer_token
    logits = min(tokens * config.vocab_size * element_size, kept_logits_bytes)
    return layers + logits


def head_gradient_bytes(config: DecoderConfig) -> int:
    """The LM head's fp32 gradient accumulator, which the chunked logprobs' backward allocates whole
    (areal_async/model/logprobs.py): vocabulary x hidden x 4 bytes."""
    return config.vocab_size * config.hidden_size * 4


def engine_working_bytes(config: DecoderConfig, element_size: int, prefill_tokens: int, max_slots: int) -> int:
    """The built-in engine's working memory beside its weights and KV pool: a prefill forward's widest tensors
    (the fused gate/up output and its product, plus four hidden-wide ones per token) and a decode step's fp32
    logits for every slot."""
    prefill = prefill_tokens * (3 * config.intermediate_size + 4 * config.hidden_size) * element_size
    return prefill + max_slots * config.vocab_size * 4


@dataclass
class MemoryPlan:
    """Bytes of each part of an inline run's GPU, by phase (module docstring). `block_bytes` is one KV block."""

    total: int
    reserve: int
    engine_weights: int
    learner_resident: int  # fp32 master weights, AdamW moments (and the frozen reference)
    publication_resident: int  # the publisher's bits of this and the previous version
    engine_working: int  # generation
    kv_cache: int  # generation
    learner_training: int  # training: gradients, autocast copies, one micro-batch's activations, head gradient
    publication_cast: int  # publication: the full weights, cast, and three buckets of scratch
    micro_batch_tokens: int
    block_bytes: int
    block_size: int
    longest_sequence: int  # prompt + max_new_tokens
    expected_sequence: int  # the tokens a sequence in flight is planned to hold
    max_slots: int

    @property
    def resident(self) -> int:
        """What every phase holds, the reserve included."""
        return self.engine_weights + self.learner_resident + self.publication_resident + self.reserve

    @property
    def phases(self) -> dict[str, int]:
        """Each phase's peak, the reserve included."""
        return {"generation": self.resident + self.engine_working + self.kv_cache,
                "training": self.resident + self.learner_training,
                "publication": self.resident + self.publication_cast}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_allocated(self) -> int:
        """The peak of the tensors themselves (what torch.cuda.max_memory_allocated measures): the reserve is not
        allocated through torch."""
        return self.peak - self.reserve

    @property
    def blocks(self) -> int:
        """Blocks of the pool, the null block included."""
        return self.kv_cache // self.block_bytes

    @property
    def sequences(self) -> int:
        """Sequences planned at once (0: the pool cannot hold one of the longest request)."""
        usable = self.blocks - 1
        if usable < blocks_for(self.longest_sequence, self.block_size):
            return 0
        return int(min(self.max_slots, usable // blocks_for(self.expected_sequence, self.block_size)))

    def parts(self) -> tuple[Part, ...]:
        """The plan's parts, each with the phase that holds it (what `describe` and `areal-async plan` list)."""
        return (Part("engine weights", self.engine_weights),
                Part("learner: fp32 weights, AdamW moments (and KL reference)", self.learner_resident),
                Part("weight publisher: this and the previous version", self.publication_resident),
                Part("reserve (context, workspaces, fragmentation)", self.reserve),
                Part("engine KV pool", self.kv_cache, Phase.generation, kv_cache=True),
                Part("engine working memory (prefill, logits)", self.engine_working, Phase.generation),
                Part(f"gradients, autocast copies, activations of {self.micro_batch_tokens:,} tokens (est.)",
                     self.learner_training, Phase.training),
                Part("the weights, cast, and the receiver's scratch", self.publication_cast, Phase.publishing))

    def describe(self) -> str:
        headings = {Phase.always: "held in every phase:", Phase.generation: "generation adds:",
                    Phase.training: "training adds (the KV pool released):", Phase.publishing: "publication adds:"}
        lines, parts = [], self.parts()
        for phase, heading in headings.items():
            lines.append(f"  {heading}")
            lines += [f"    {part.name:<70}{part.size / GIB:8.2f} GiB" for part in parts if part.phase is phase]
        phases = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.phases.items())
        lines.append(f"  peak by phase: {phases} GiB of {self.total / GIB:.2f} GiB")
        lines.append(f"  KV pool: {max(0, self.blocks - 1):,} blocks of {self.block_size} tokens; about "
                     f"{self.sequences} sequences at once of {self.expected_sequence:,} tokens expected (the "
                     f"longest, {self.longest_sequence:,} tokens, needs "
                     f"{blocks_for(self.longest_sequence, self.block_size):,} blocks)")
        return "\n".join(lines)


def plan_one_gpu(config: DecoderConfig, total_bytes: int, engine_dtype: torch.dtype, compute_element_size: int,
                 micro_batch_tokens: int, prompt_tokens: int, max_new_tokens: int, kv_memory_gib: float | None,
                 block_size: int = 64, expected_fraction: float = 0.25, max_slots: int = 256,
                 activation_checkpointing: bool = False, reference_model: bool = False,
                 kept_logits_bytes: int = 6 * GIB, prefill_tokens: int = 16384) -> MemoryPlan:
    """The plan of an inline run on one GPU of `total_bytes`, its phases sharing the memory in time (module
    docstring); the micro-batch is the largest multiple of 1,024 tokens up to `micro_batch_tokens` whose training
    phase fits (`micro_batch_tokens` itself when it fits). Raises InputError (the command line prints it and exits)
    with the numbers when a phase does not fit or the KV pool holds no sequence of prompt_tokens + max_new_tokens
    tokens."""
    params = parameter_count(config)
    engine_element_size = element_size(engine_dtype)
    autocast_copy = compute_element_size if compute_element_size < 4 else 0
    engine_weights = params * engine_element_size
    longest = prompt_tokens + max_new_tokens
    block_bytes = kv_block_bytes(config, block_size, engine_dtype)

    def plan_with(micro_batch: int, kv_cache: int) -> MemoryPlan:
        # a sequence longer than the micro-batch gets a pack of its own: the longest pack holds it whole
        training = params * (4 + autocast_copy) + head_gradient_bytes(config) + activation_bytes(
            config, max(micro_batch, longest), compute_element_size, activation_checkpointing, kept_logits_bytes)
        return MemoryPlan(
            total=total_bytes, reserve=reserve_bytes(total_bytes), engine_weights=engine_weights,
            learner_resident=params * (12 + (compute_element_size if reference_model else 0)),
            publication_resident=2 * engine_weights,
            engine_working=engine_working_bytes(config, engine_element_size, prefill_tokens, max_slots),
            kv_cache=kv_cache, learner_training=training,
            publication_cast=engine_weights + 3 * min(DEFAULT_BUCKET_BYTES, engine_weights),
            micro_batch_tokens=micro_batch, block_bytes=block_bytes, block_size=block_size, longest_sequence=longest,
            expected_sequence=expected_sequence_tokens(prompt_tokens, max_new_tokens, expected_fraction),
            max_slots=max_slots)

    micro_batch = micro_batch_tokens
    while micro_batch > 1024 and plan_with(micro_batch, 0).phases["training"] > total_bytes:
        micro_batch = (micro_batch - 1) // 1024 * 1024  # the next multiple of 1,024 below
    plan = plan_with(micro_batch, 0)
    left = total_bytes - plan.phases["generation"]
    kv_cache = left if kv_memory_gib is None else int(kv_memory_gib * GIB)
    plan.kv_cache = max(0, kv_cache) // block_bytes * block_bytes  # whole blocks, as the engine allocates them
    if plan.peak > total_bytes or plan.sequences < 1:
        setting = ("engine.kv_memory_gib is unset, so the KV pool gets what generation leaves" if kv_memory_gib is None
                   else f"engine.kv_memory_gib={kv_memory_gib:g}")
        raise InputError(
            f"the run does not fit on one GPU ({setting}; ppo.micro_batch_tokens={micro_batch:,}):\n"
            f"{plan.describe()}\n"
            "lower engine.kv_memory_gib or generation.max_new_tokens, set ppo.activation_checkpointing=true, or place "
            "the learner on other GPUs (cluster.placement=ray)"
        )
    return plan


class Phase(enum.Enum):
    """When a part of a process's memory is held: always, or only during one of the phases that never overlap
    in a process (so its peak counts the largest of them)."""

    always = "always"
    generation = "generation"  # an inline run's engine decoding (its KV pool is released while it trains)
    training = "training"  # a micro-batch's forward and backward
    publishing = "publishing"  # rank 0 gathering the full weights of a new version


@dataclass(frozen=True)
class Part:
    """`size` bytes of one process's GPU memory, named for the plan's report."""

    name: str
    size: int
    phase: Phase = Phase.always
    kv_cache: bool = False  # an engine's KV cache, the part a plan that does not fit can shrink


def peak_bytes(parts: Sequence[Part]) -> int:
    """A process's peak: what it always holds plus the largest of its phases' parts."""
    always = sum(p.size for p in parts if p.phase is Phase.always)
    return always + max(sum(p.size for p in parts if p.phase is phase) for phase in Phase if phase is not Phase.always)


def learner_rank_parts(config: DecoderConfig, ranks: int, rank: int, total_bytes: int, compute_element_size: int,
                       publish_dtype: torch.dtype, micro_batch_tokens: int, longest_sequence: int,
                       activation_checkpointing: bool, reference_model: bool,
                       kept_logits_bytes: int = 6 * GIB) -> list[Part]:
    """The GPU memory of learner rank `rank` of `ranks` (learners/fsdp_learner.py) on a GPU of `total_bytes`.

    ranks > 1 (FSDP2): 16 bytes per parameter / ranks (fp32 weights, gradients, two AdamW moments), a frozen fp32
    reference / ranks with the KL term, and while computing the gathered compute-dtype weights of the root (kept
    after forward) and of two layers (the one computed and the one prefetched). One rank: the plain path, fp32
    state plus the compute-dtype copies autocast makes (as `plan_one_gpu`). A micro-batch holds at least one
    whole sequence, so its activations are those of max(micro_batch_tokens, longest_sequence) tokens. Rank 0
    also publishes: the publisher keeps two copies of the weights' bits in `publish_dtype`, and a publication
    gathers the full weights one fp32 parameter at a time (FSDP), casting each to `publish_dtype`."""
    params = parameter_count(config)
    publish_size = element_size(publish_dtype)
    sharded = ranks > 1
    share = -(-params // ranks)  # FSDP pads every parameter's first dimension to a multiple of ranks
    parts = []
    if sharded:
        parts.append(Part(f"policy state: fp32 weights, grads, AdamW moments (16 B/param over {ranks} ranks)",
                          16 * share))
        if reference_model:
            parts.append(Part(f"frozen reference for the KL term (fp32 over {ranks} ranks)", 4 * share))
        gathered = root_parameter_count(config) + 2 * layer_parameter_count(config)
        parts.append(Part(f"gathered compute weights: root and 2 layers{' (x2: reference)' if reference_model else ''}",
                          gathered * compute_element_size * (2 if reference_model else 1), Phase.training))
    else:
        autocast_copy = compute_element_size if compute_element_size < 4 else 0
        parts.append(Part("policy state: fp32 weights, grads, AdamW moments, autocast copies",
                          params * (16 + autocast_copy)))
        if reference_model:
            parts.append(Part("frozen reference for the KL term (compute dtype)", params * compute_element_size))
    tokens = max(micro_batch_tokens, longest_sequence)
    parts.append(Part(f"activations, one micro-batch of {tokens:,} tokens (estimate)",
                      activation_bytes(config, tokens, compute_element_size, activation_checkpointing,
                                       kept_logits_bytes), Phase.training))
    parts.append(Part("LM head's fp32 gradient accumulator", head_gradient_bytes(config), Phase.training))
    if rank == 0:
        parts.append(Part("weight publisher's bits (this and the previous version)", 2 * params * publish_size))
        largest = config.vocab_size * config.hidden_size  # the embedding (or LM head): the largest parameter
        gather = params * publish_size + (4 * largest if sharded else 0)
        parts.append(Part("a publication: the full weights, cast" + (" as gathered" if sharded else ""), gather,
                          Phase.publishing))
    parts.append(Part("reserve (CUDA context, workspaces, fragmentation)", reserve_bytes(total_bytes)))
    return parts


def engine_parts(config: DecoderConfig, dtype: torch.dtype, total_bytes: int, blocks: int, block_size: int,
                 receiver_bucket_bytes: int = 0) -> list[Part]:
    """The GPU memory of a built-in engine with a KV pool of `blocks` blocks of `block_size` positions (the null
    block included; 0: no pool) on a GPU of `total_bytes`: its weights in `dtype`, its KV pool, a rollout
    worker's weight-receiver scratch bucket, its process's reserve."""
    parts = [Part(f"engine weights ({str(dtype).removeprefix('torch.')})", parameter_count(config) * element_size(dtype))]
    if receiver_bucket_bytes:
        parts.append(Part("weight receiver's scratch bucket", receiver_bucket_bytes))
    if blocks:
        parts.append(Part(f"engine KV pool: {blocks:,} blocks x {block_size} positions",
                          blocks * kv_block_bytes(config, block_size, dtype), kv_cache=True))
    parts.append(Part("reserve (CUDA context, workspaces, fragmentation)", reserve_bytes(total_bytes)))
    return parts
