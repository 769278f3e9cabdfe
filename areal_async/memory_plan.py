"""The memory budget of a run with the engine and the learner on one GPU.

Both live in one process and share the GPU's memory: the engine's weights (in the generation dtype), the
learner's state (fp32 master weights, fp32 gradients and AdamW's two fp32 moments: 16 bytes per parameter,
plus the compute-dtype copies autocast keeps for a pass and a frozen reference when the KL term is on), the
learner's activations for one micro-batch, the weight publication's buffers (the published cast, this
version's and the previous version's bits: three copies of the engine's weights), and the engine's KV cache.
The KV cache is the one budget that is set (`engine.kv_memory_gib`); left unset, it is what the rest leaves. A plan that cannot hold one sequence of
the longest request fails at start with the numbers.

Activation memory per token of a pass is estimated from the layer shapes: about 10 x hidden + 2 x intermediate
elements of the compute dtype per layer (what the compiled layers keep for backward), fitted to the measured
peak of the learner benchmark on the 1.5B shape (62.0 GiB for 16,384 tokens on an H100: 26.5 GiB of state,
3.3 GiB of bf16 weight copies, 4.6 GiB of kept logits, leaving about 63 KB per token and layer). With
activation checkpointing one layer's worth plus the layer inputs are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from areal_async.model.decoder import DecoderConfig
from areal_async.model.slot_cache import slot_cache_bytes

GIB = 2**30
# The CUDA context, cuBLAS/cuDNN workspaces, compiled kernels and allocator fragmentation.
RESERVE_FRACTION = 0.04
RESERVE_MIN_BYTES = 3 * GIB


def parameter_count(config: DecoderConfig) -> int:
    """Parameters of the decoder `config` describes (embeddings and LM head included)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    if config.attention_bias:  # q/k/v biases (Qwen2)
        attention += head_dim * (config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * hidden * config.intermediate_size
    layer = attention + mlp + 2 * hidden
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * layer + embeddings + hidden


def activation_bytes(config: DecoderConfig, tokens: int, element_size: int, checkpointing: bool,
                     kept_logits_bytes: int) -> int:
    """An estimate of the activations one forward/backward pass over `tokens` packed tokens keeps."""
    per_layer_token = (10 * config.hidden_size + 2 * config.intermediate_size) * element_size
    if checkpointing:
        layers = tokens * (config.num_hidden_layers * config.hidden_size * element_size + per_layer_token)
    else:
        layers = tokens * config.num_hidden_layers * per_layer_token
    logits = min(tokens * config.vocab_size * element_size, kept_logits_bytes)
    return layers + logits


@dataclass
class MemoryPlan:
    """Bytes of each part; `kv_cache` is the engine's budget."""

    total: int
    engine_weights: int
    learner_state: int
    learner_activations: int
    publication: int
    reserve: int
    kv_cache: int
    kv_per_sequence: int  # one sequence of the longest request

    @property
    def used(self) -> int:
        return (self.engine_weights + self.learner_state + self.learner_activations + self.publication
                + self.reserve + self.kv_cache)

    @property
    def sequences(self) -> int:
        """Sequences of the longest request that the KV budget holds at once."""
        return self.kv_cache // max(1, self.kv_per_sequence)

    def describe(self) -> str:
        parts = [("engine weights", self.engine_weights), ("learner state (fp32 master, grads, AdamW)",
                 self.learner_state), ("learner activations, one micro-batch (estimate)", self.learner_activations),
                 ("weight publication buffers", self.publication),
                 ("reserve (context, workspaces, fragmentation)", self.reserve), ("engine KV cache", self.kv_cache)]
        lines = [f"  {name:<52} {value / GIB:8.2f} GiB" for name, value in parts]
        lines.append(f"  {'sum':<52} {self.used / GIB:8.2f} GiB of {self.total / GIB:.2f} GiB")
        lines.append(f"  KV cache holds {self.sequences} sequences of the longest request "
                     f"({self.kv_per_sequence / GIB:.3f} GiB each)")
        return "\n".join(lines)


def plan_one_gpu(config: DecoderConfig, total_bytes: int, engine_dtype: torch.dtype, compute_element_size: int,
                 micro_batch_tokens: int, longest_sequence: int, kv_memory_gib: float | None,
                 kv_bucket: int = 64, activation_checkpointing: bool = False, reference_model: bool = False,
                 kept_logits_bytes: int = 6 * GIB) -> MemoryPlan:
    """The plan of an inline run on one GPU of `total_bytes`; raises ValueError with the numbers when the
    parts do not fit or the KV budget holds no sequence of `longest_sequence` tokens (prompt + new tokens)."""
    params = parameter_count(config)
    engine_element_size = torch.empty((), dtype=engine_dtype).element_size()
    learner_state = params * (16 + (compute_element_size if compute_element_size < 4 else 0))
    if reference_model:
        learner_state += params * compute_element_size
    activations = activation_bytes(config, micro_batch_tokens, compute_element_size, activation_checkpointing,
                                   kept_logits_bytes)
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * total_bytes))
    engine_weights = params * engine_element_size
    length = -(-longest_sequence // kv_bucket) * kv_bucket
    per_sequence = slot_cache_bytes(config, 1, length, engine_dtype) - slot_cache_bytes(config, 0, length, engine_dtype)
    publication = 3 * engine_weights
    fixed = engine_weights + learner_state + activations + publication + reserve
    kv_cache = total_bytes - fixed if kv_memory_gib is None else int(kv_memory_gib * GIB)
    plan = MemoryPlan(total_bytes, engine_weights, learner_state, activations, publication, reserve, max(0, kv_cache),
                      per_sequence)
    if fixed + max(0, kv_cache) > total_bytes or plan.sequences < 1:
        setting = ("engine.kv_memory_gib is unset, so the KV cache gets what is left" if kv_memory_gib is None
                   else f"engine.kv_memory_gib={kv_memory_gib:g}")
        raise ValueError(
            f"the run does not fit on one GPU ({setting}):\n{plan.describe()}\n"
            "lower engine.kv_memory_gib, ppo.micro_batch_tokens or generation.max_new_tokens, set "
            "ppo.activation_checkpointing=true, or place the learner on other GPUs (cluster.placement=ray)"
        )
    return plan
