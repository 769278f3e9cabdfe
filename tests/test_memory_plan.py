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
    plan = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, micro_batch_tokens=10, prompt_tokens=4,
                        max_new_tokens=16, kv_memory_gib=None, block_size=16)
    assert plan.engine_weights == 2824 * 2
    assert plan.learner_state == 2824 * (16 + 2)  # fp32 master, grads, two moments + the bf16 compute copy
    # the longest sequence (4 + 16 = 20 tokens) exceeds the 10-token micro-batch: its own pack is planned,
    # (10 x 8 + 2 x 16) x 2 bytes x 20 tokens x 2 layers + its logits 20 x 100 x 2, and the LM head's fp32
    # gradient accumulator 100 x 8 x 4
    assert plan.learner_activations == 8960 + 4000 + 3200
    assert plan.publication == 3 * 2824 * 2
    assert plan.reserve == 3 * GIB  # the floor: 4% of 4 GiB is less
    # a block: keys and values x 2 layers x 16 positions x 1 KV head x 4 dims x 2 bytes
    assert plan.block_bytes == 2 * 2 * 16 * 1 * 4 * 2 == 512
    left = 4 * GIB - (5648 + 50832 + 16160 + 16944 + 3 * GIB)
    assert plan.kv_cache == left // 512 * 512 and plan.blocks == left // 512  # whole blocks: what is left
    assert plan.used == 4 * GIB - left % 512
    # planned: prompt 4 + a quarter of 16 new tokens = 8 tokens, one block each; max_slots (256) binds
    assert plan.expected_sequence == 8 and plan.longest_sequence == 20 and plan.sequences == 256
    with_reference = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 16, None, 16, reference_model=True)
    assert with_reference.learner_state == plan.learner_state + 2824 * 2


def test_the_pool_is_planned_by_the_expected_length_not_the_longest():
    config = DecoderConfig(**TOY)
    # 41 blocks of 512 bytes = 40 usable: 4 + 0.25 x 60 = 19 tokens expected (2 blocks), the longest 64 (4 blocks)
    plan = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 60, kv_memory_gib=41 * 512 / GIB, block_size=16)
    assert plan.blocks == 41 and plan.expected_sequence == 19 and plan.sequences == 20
    assert "KV pool: 40 blocks of 16 tokens; about 20 sequences at once of 19 tokens expected" in plan.describe()
    half = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 60, 41 * 512 / GIB, 16, expected_fraction=1.0)
    assert half.sequences == 10  # each expected to fill its limit: 4 blocks


def test_plan_that_cannot_fit_names_the_setting_and_the_numbers():
    config = DecoderConfig(**TOY)
    with pytest.raises(ValueError, match=r"engine.kv_memory_gib=2(.|\n)*engine KV pool +2.00 GiB"):
        plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 16, kv_memory_gib=2.0, block_size=16)
    with pytest.raises(ValueError, match="about 0 sequences at once"):  # one usable block: none of 20 tokens
        plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 16, kv_memory_gib=2 * 512 / GIB, block_size=16)
    assert plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 16, kv_memory_gib=0.5,
                        block_size=16).kv_cache == GIB // 2
