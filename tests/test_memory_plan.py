"""The one-GPU memory plan: parameter counts against the model, each part against hand-computed bytes."""

import pytest
import torch

from areal_async.memory_plan import GIB, activation_bytes, parameter_count, plan_one_gpu
from areal_async.model import CausalLM, DecoderConfig

TOY = dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_equals_the_models(tie):
    config = DecoderConfig(**{**TOY, "tie_word_embeddings": tie})
    assert parameter_count(config) == sum(p.numel() for p in CausalLM(config).parameters())


def test_parameter_count_by_hand():
    # per layer: q,o 8x4x2 each, k,v 8x4x1 each = 192; biases 4x(2+1+1) = 16; mlp 3x8x16 = 384; 2 norms x 8
    # = 16 -> 608; two layers 1216; untied embeddings 2x100x8 = 1600; final norm 8
    assert parameter_count(DecoderConfig(**TOY)) == 1216 + 1600 + 8


def test_activation_bytes_by_hand():
    config = DecoderConfig(**TOY)
    # (10 x 8 + 2 x 16) x 2 bytes = 224 per token and layer; 10 tokens x 2 layers; logits 10 x 100 x 2 bytes
    assert activation_bytes(config, 10, 2, checkpointing=False, kept_logits_bytes=GIB) == 4480 + 2000
    assert activation_bytes(config, 10, 2, checkpointing=False, kept_logits_bytes=500) == 4480 + 500
    # checkpointing keeps each layer's input (10 tokens x 2 layers x 8 x 2 bytes) and one layer's activations
    assert activation_bytes(config, 10, 2, checkpointing=True, kept_logits_bytes=GIB) == 320 + 2240 + 2000


def test_plan_parts_by_hand():
    config = DecoderConfig(**TOY)
    plan = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, micro_batch_tokens=10, longest_sequence=20,
                        kv_memory_gib=None, kv_bucket=16)
    assert plan.engine_weights == 2824 * 2
    assert plan.learner_state == 2824 * (16 + 2)  # fp32 master, grads, two moments + the bf16 compute copy
    assert plan.learner_activations == 4480 + 2000
    assert plan.publication == 3 * 2824 * 2
    assert plan.reserve == 3 * GIB  # the floor: 4% of 4 GiB is less
    assert plan.kv_cache == 4 * GIB - (5648 + 50832 + 6480 + 16944 + 3 * GIB)
    # 20 tokens round up to 32 positions (+1 spare): keys and values x 2 layers x 1 KV head x 33 x 4 x 2 bytes
    assert plan.kv_per_sequence == 2 * 2 * 33 * 4 * 2
    assert plan.sequences == plan.kv_cache // 1056
    assert plan.used == 4 * GIB
    with_reference = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 20, None, 16, reference_model=True)
    assert with_reference.learner_state == plan.learner_state + 2824 * 2


def test_plan_that_cannot_fit_names_the_setting_and_the_numbers():
    config = DecoderConfig(**TOY)
    with pytest.raises(ValueError, match=r"engine.kv_memory_gib=2(.|\n)*engine KV cache +2.00 GiB"):
        plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 20, kv_memory_gib=2.0, kv_bucket=16)
    with pytest.raises(ValueError, match="KV cache holds 0 sequences"):
        plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 20, kv_memory_gib=1e-7, kv_bucket=16)
    assert plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 20, kv_memory_gib=0.5, kv_bucket=16).kv_cache == GIB // 2
