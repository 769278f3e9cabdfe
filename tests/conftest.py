import pytest
import torch

from areal_async.model import CausalLM, DecoderConfig

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def tiny_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(DecoderConfig(**TINY))
