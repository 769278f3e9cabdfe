"""The one-GPU memory plan: parameter counts against the model, each part against hand-computed bytes."""

import pytest
import torch

from areal_async.planning.memory_plan import GIB, activation_bytes, parameter_count, plan_one_gpu
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
    # int(1.3 x (10 x 8 + 2 x 16)) = 145 elements x 2 bytes = 290 per token and layer; 10 tokens x 2 layers;
    # logits 10 x 100 x 2 bytes
    assert activation_bytes(config, 10, 2, checkpointing=False, kept_logits_bytes=GIB) == 5800 + 2000
    assert activation_bytes(config, 10, 2, checkpointing=False, kept_logits_bytes=500) == 5800 + 500
    # checkpointing keeps each layer's input (10 tokens x 2 layers x 8 x 2 bytes) and one layer's activations
    assert activation_bytes(config, 10, 2, checkpointing=True, kept_logits_bytes=GIB) == 320 + 2900 + 2000


def test_plan_parts_and_phases_by_hand():
    config = DecoderConfig(**TOY)
    plan = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, micro_batch_tokens=10, prompt_tokens=4,
                        max_new_tokens=16, kv_memory_gib=None, block_size=16)
    assert plan.engine_weights == 2824 * 2
    assert plan.learner_resident == 2824 * 12  # fp32 master weights and two AdamW moments
    assert plan.publication_resident == 2 * 2824 * 2
    assert plan.publication_cast == 2824 * 2 * 4  # the cast and three buckets of scratch, each the toy's weights
    assert plan.reserve == 3 * GIB  # the floor: 4% of 4 GiB is less
    # a prefill of 16,384 tokens x (3 x 16 + 4 x 8) x 2 bytes, and fp32 logits of 256 slots x 100
    assert plan.engine_working == 16384 * 80 * 2 + 256 * 100 * 4
    # gradients (4 bytes) and autocast copies (2) per parameter, the LM head's fp32 gradient 100 x 8 x 4, and the
    # activations of the longest sequence (4 + 16 = 20 tokens, longer than the 10-token micro-batch: its own pack),
    # 290 bytes x 20 tokens x 2 layers + its logits 20 x 100 x 2
    assert plan.learner_training == 2824 * 6 + 3200 + 11600 + 4000
    assert plan.micro_batch_tokens == 10
    # a block: keys and values x 2 layers x 16 positions x 1 KV head x 4 dims x 2 bytes
    assert plan.block_bytes == 2 * 2 * 16 * 1 * 4 * 2 == 512
    resident = 5648 + 33888 + 11296 + 3 * GIB
    left = 4 * GIB - resident - plan.engine_working
    assert plan.kv_cache == left // 512 * 512 and plan.blocks == left // 512  # whole blocks: what generation leaves
    assert plan.phases == {"generation": 4 * GIB - left % 512, "training": resident + plan.learner_training,
                           "publication": resident + 4 * 5648}
    assert plan.peak == plan.phases["generation"] and plan.peak_allocated == plan.peak - 3 * GIB
    # planned: prompt 4 + a quarter of 16 new tokens = 8 tokens, one block each; max_slots (256) binds
    assert plan.expected_sequence == 8 and plan.longest_sequence == 20 and plan.sequences == 256
    with_reference = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, 10, 4, 16, None, 16, reference_model=True)
    assert with_reference.learner_resident == plan.learner_resident + 2824 * 2


def test_the_micro_batch_is_lowered_to_what_the_training_phase_fits():
    config = DecoderConfig(**TOY)
    # 1 GiB beside the 3 GiB reserve; resident 50,832 bytes; training: 2824 x 6 + 3200 fixed, then 2 x 290 bytes
    # of layers and 200 of logits per token: at most (2**30 - 50832 - 20144) // 780 = 1,376,497 tokens, of which
    # the largest multiple of 1,024 is 1,344 x 1,024
    plan = plan_one_gpu(config, 4 * GIB, torch.bfloat16, 2, micro_batch_tokens=2_000_000, prompt_tokens=4,
                        max_new_tokens=16, kv_memory_gib=0.001, block_size=16)
    assert plan.micro_batch_tokens == 1344 * 1024
    assert plan.phases["training"] <= 4 * GIB < plan.phases["training"] + 1024 * 780
    assert "activations of 1,376,256 tokens" in plan.describe()


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
