"""Decoder shapes (DecoderConfig keyword arguments) of public checkpoints: what the benchmarks time with random
weights and what `areal-async plan` budgets before the weights are on disk (`model.shape`). The numbers are
those of the checkpoints' config.json."""

from __future__ import annotations

from areal_async.config import ModelShape
from areal_async.model.decoder import DecoderConfig

# DeepSeek-R1-Distill-Qwen-1.5B: Qwen2 with the real 151,936-token vocabulary and an untied LM head.
R1_DISTILL_QWEN_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=False,
)
# Qwen2.5-7B, the base model of the zero-RL recipe: 28 query and 4 key/value heads of 128, untied LM head.
QWEN2_5_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, tie_word_embeddings=False,
    rope_theta=1000000.0,
)
# Qwen2.5-0.5B: 494M parameters, the embedding tied to the LM head.
QWEN2_5_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
)
# SmolLM-135M: a Llama (no q/k/v biases) of 135M parameters, the embedding tied to the LM head.
SMOLLM_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    attention_bias=False, model_type="llama",
)
# The benchmarks' --tiny mode: the same code paths in seconds on a CPU.
TINY_BENCHMARK = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
)

KNOWN_SHAPES: dict[ModelShape, dict] = {
    ModelShape.r1_distill_qwen_1_5b: R1_DISTILL_QWEN_1_5B,
    ModelShape.qwen2_5_7b: QWEN2_5_7B,
}


def known_shape(shape: ModelShape) -> DecoderConfig:
    """The DecoderConfig of a built-in shape."""
    return DecoderConfig(**KNOWN_SHAPES[shape])
