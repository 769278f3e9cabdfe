"""Decoder shapes (DecoderConfig keyword arguments) of the models the benchmarks time with random weights."""

# DeepSeek-R1-Distill-Qwen-1.5B: Qwen2 with the real 151,936-token vocabulary and an untied LM head.
R1_DISTILL_QWEN_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=False,
)
# The benchmarks' --tiny mode: the same code paths in seconds on a CPU.
TINY_BENCHMARK = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
)
