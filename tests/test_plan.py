"""`areal-async plan`: the recipes' placement on 1, 4 and 16 nodes (every GPU used once, the same share per node),
their per-GPU memory against bytes computed by hand, the 24K stage that does not fit without a KV budget, and
the shape lookup without weights."""

import json
from collections import Counter

import pytest
import torch

from areal_async.config import EngineConfig, ModelConfig, ModelShape
from areal_async.planning.memory_plan import GIB, engine_sequences, parameter_count
from areal_async.model import DecoderConfig
from areal_async.model.shapes import known_shape
from areal_async.planning.placement import Role, inline_gpu_plan, layout, model_shape, plan_run, ranges
from areal_async.run.cli import compose_config, main
from areal_async.run.sft import BUNDLED_WARMSTART

R1_1_5B = known_shape(ModelShape.r1_distill_qwen_1_5b)
PARAMS_1_5B = 1_777_088_000  # DeepSeek-R1-Distill-Qwen-1.5B's published size, 1.78B


def recipe_plan(nodes: int, max_new_tokens: int, *overrides: str, recipe: str = "recipe_1.5B"):
    config = compose_config(recipe, [f"cluster=n{nodes}", f"generation.max_new_tokens={max_new_tokens}", *overrides])
    shape, source = model_shape(config.model, BUNDLED_WARMSTART)
    return plan_run(config, shape, source, prompt_tokens=1024)


BLOCK_BYTES = 2 * 28 * 64 * 2 * 128 * 2  # keys and values, bf16: 28 layers x 64 positions x 2 KV heads x 128


def test_the_built_in_shape_is_the_checkpoints():
    assert parameter_count(R1_1_5B) == PARAMS_1_5B
    assert parameter_count(known_shape(ModelShape.qwen2_5_7b)) == 7_615_616_512  # Qwen2.5-7B: 7.61B


@pytest.mark.parametrize("nodes", [1, 4, 16])
def test_every_gpu_runs_one_actor_and_every_node_the_same_share(nodes):
    plan = recipe_plan(nodes, 8192)
    actors = [seat for seat in plan.seats if seat.role in (Role.learner_rank, Role.rollout_worker)]
    assert Counter((seat.node, seat.gpu) for seat in actors) == {(n, g): 1 for n in range(nodes) for g in range(8)}
    for role, per_node in ((Role.learner_rank, 2), (Role.rollout_worker, 6)):
        mine = [seat for seat in actors if seat.role is role]
        assert sorted(seat.index for seat in mine) == list(range(per_node * nodes))
        assert Counter(seat.node for seat in mine) == {node: per_node for node in range(nodes)}
    # a node's learner ranks are consecutive and on its first GPUs
    assert {(seat.index, seat.node, seat.gpu) for seat in actors if seat.role is Role.learner_rank} == {
        (2 * node + gpu, node, gpu) for node in range(nodes) for gpu in range(2)}
    (driver,) = [seat for seat in plan.seats if seat.role is Role.driver]
    assert (driver.node, driver.gpu) == (0, 1)  # device=cuda:1, beside learner rank 1
    assert [(shard.index, shard.node) for shard in plan.shards] == [(k, k) for k in range(nodes)]
    # 2048 groups x 8 samples x (1024 prompt tokens x 4 bytes + 8192 new tokens x 12 bytes)
    assert plan.shards[0].host_bytes == 2048 * 8 * (4 * 1024 + 12 * 8192)


@pytest.mark.parametrize("nodes", [1, 4, 16])
def test_the_1_5B_recipe_at_8K_fits_with_bytes_computed_by_hand(nodes):
    plan = recipe_plan(nodes, 8192)
    assert plan.fits, plan.describe()
    ranks = 2 * nodes
    by_seat = {(p.seat.role, p.seat.index): p for gpu in plan.gpus for p in gpu.processes}
    worker = {part.name: part.size for part in by_seat[(Role.rollout_worker, 0)].parts}
    assert worker["engine weights (bfloat16)"] == 2 * PARAMS_1_5B
    # kv_memory_gib=64: whole blocks of 1,835,008 bytes, the null block among them
    assert worker["engine KV pool: 37,449 blocks x 64 positions"] == 37_449 * BLOCK_BYTES == 68_719_214_592
    rank = {part.name: part.size for part in by_seat[(Role.learner_rank, 1)].parts}
    state = f"policy state: fp32 weights, grads, AdamW moments (16 B/param over {ranks} ranks)"
    assert rank[state] == 16 * -(-PARAMS_1_5B // ranks)
    assert rank["LM head's fp32 gradient accumulator"] == 151_936 * 1536 * 4  # the whole head: 0.87 GiB
    rank0 = {part.name: part.size for part in by_seat[(Role.learner_rank, 0)].parts}
    assert rank0["weight publisher's bits (this and the previous version)"] == 2 * 2 * PARAMS_1_5B
    fullest = max(plan.gpus, key=lambda gpu: gpu.used)
    assert fullest.processes[0].seat.role is Role.rollout_worker and fullest.used <= 80 * GIB
    # 1,024 prompt tokens + a quarter of 8,192 expected: 48 blocks; 37,448 // 48 = 780, so max_slots binds
    assert "each rollout worker decodes 256 sequences at once (3,072 tokens expected each, up to 9,216)" in plan.summary


def test_the_24K_stage_fits_with_the_recipes_kv_budget():
    plan = recipe_plan(1, 24000)
    assert plan.fits, plan.describe()
    # 1,024 + 6,000 expected tokens = 110 blocks: 37,448 // 110 = 340 sequences, max_slots 256 binds
    assert engine_sequences(37_449, 256, 64, 1024, 24000, 0.25) == 256
    assert engine_sequences(37_449, 1024, 64, 1024, 24000, 0.25) == 340
    assert "decodes 256 sequences at once (7,024 tokens expected each, up to 25,024)" in plan.summary
    assert engine_sequences(391, 256, 64, 1024, 24000, 0.25) == 0  # 390 usable blocks: none of 25,024 tokens


def test_the_24K_stage_without_a_kv_budget_does_not_fit_and_says_by_how_much():
    plan = recipe_plan(1, 24000, "engine.kv_memory_gib=null")
    assert not plan.fits
    kv_need = (256 * 391 + 1) * BLOCK_BYTES  # 256 slots of the longest request (391 blocks) and the null block
    left = 80 * GIB - 2 * PARAMS_1_5B - 256 * 2**20 - int(0.04 * 80 * GIB)  # weights, receiver bucket, reserve
    assert f"{kv_need / GIB:.2f}" == "171.06" and f"{left / GIB:.2f}" == "73.24"
    text = "\n".join(plan.failures)
    assert "does not fit: rollout workers 0-5 (6 GPUs, each) needs 177.82 GiB of cluster.gpu_memory_gib=80" in text
    assert ("the engine KV pool needs 171.06 GiB but 73.24 GiB is left for it: about 256 sequences of 7,024 tokens "
            "expected fit at once") in text
    assert "engine.kv_memory_gib=73.2" in text
    assert engine_sequences(left // BLOCK_BYTES, 1024, 64, 1024, 24000, 0.25) == 389
    assert {gpu.gpu for gpu in plan.gpus if not gpu.fits} == set(range(2, 8))  # the learners' GPUs fit


def test_the_cli_exits_1_with_the_numbers_when_the_plan_does_not_fit(capsys):
    assert main(["plan", "--config", "recipe_1.5B", "cluster=n16", "generation.max_new_tokens=24000",
                 "engine.kv_memory_gib=null"]) == 1
    out = capsys.readouterr().out
    assert "rollout workers 0-95 (96 GPUs, each): 177.82  DOES NOT FIT" in out
    assert "the engine KV pool needs 171.06 GiB but 73.24 GiB is left for it" in out
    assert main(["plan", "--config", "recipe_1.5B", "cluster=n16"]) == 0
    out = capsys.readouterr().out
    assert "node 15: GPUs 0-1: learner ranks 30-31; GPUs 2-7: rollout workers 90-95" in out


def test_the_7B_recipe_fits_80_GiB_and_publication_casts_as_it_gathers():
    plan = recipe_plan(16, 24000, recipe="recipe_7B_zero")
    assert plan.fits, plan.describe()
    rank0 = next(gpu for gpu in plan.gpus if gpu.node == 0 and gpu.gpu == 0)
    parts = {part.name: part.size for part in rank0.processes[0].parts}
    params = 7_615_616_512
    # the bf16 result plus one full fp32 parameter at a time (the largest: the 152,064 x 3,584 embedding)
    assert parts["a publication: the full weights, cast as gathered"] == params * 2 + 152_064 * 3_584 * 4
    assert parts["weight publisher's bits (this and the previous version)"] == 2 * params * 2
    # training (gathered weights 2.90, activations 17.97, the LM head's fp32 gradient accumulator 2.03 GiB) outweighs
    # publishing (16.22 GiB); no frozen KL reference: the recipe's kl_coef is 0, as AReaL's KL_CTL
    assert f"{rank0.used / GIB:.2f}" == "58.02"
    # where publishing is the larger phase and the GPU too small, the advice says more ranks do not help
    tight = recipe_plan(16, 4096, "ppo.micro_batch_tokens=8192", "cluster.gpu_memory_gib=40", recipe="recipe_7B_zero")
    text = "\n".join(tight.failures)
    assert "does not fit: learner rank 0 (node 0 GPU 0) needs 51.13 GiB of cluster.gpu_memory_gib=40" in text
    assert "a publication: the full weights, cast as gathered 16.22 GiB" in text
    assert "do not shrink with more ranks" in text


def test_the_driver_beside_a_publishing_rank_is_moved_by_the_advice():
    plan = recipe_plan(16, 24000, "device=cuda:0", "cluster.gpu_memory_gib=70", "engine.kv_memory_gib=40",
                       recipe="recipe_7B_zero")
    text = "\n".join(plan.failures)
    assert "learner rank 0 + driver engine (node 0 GPU 0) needs 75.01 GiB" in text  # no KL reference (kl_coef 0)
    assert "device=cuda:1 puts it beside learner rank on GPU 1 of node 0, which then holds 46.64 GiB" in text


@pytest.mark.parametrize("overrides, message", [
    (["cluster.num_learner_ranks=3"], "a node needs 3 + 6 GPUs"),
    (["cluster=n4", "cluster.num_rollout_workers=10"], "cluster.num_rollout_workers=10 does not split evenly over "
                                                       "cluster.nodes=4"),
    (["cluster.gpus_per_rollout_worker=0.5"], "cluster.gpus_per_rollout_worker=0.5"),
    (["device=cuda:8"], "device=cuda:8: node 0 has only cluster.gpus_per_node=8 GPUs"),
    (["rollout.engine=vllm"], "rollout.engine=vllm"),
])
def test_a_config_the_plan_cannot_lay_out_names_the_key(overrides, message, capsys):
    assert main(["plan", "--config", "recipe_1.5B", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_layout_by_hand():
    seats = layout(nodes=2, gpus_per_node=4, learner_ranks=2, rollout_workers=4)
    assert [(s.role.value, s.index, s.node, s.gpu) for s in seats] == [
        ("learner rank", 0, 0, 0), ("rollout worker", 0, 0, 1), ("rollout worker", 1, 0, 2),
        ("learner rank", 1, 1, 0), ("rollout worker", 2, 1, 1), ("rollout worker", 3, 1, 2)]
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_the_shape_comes_from_config_json_else_the_built_in_table(tmp_path):
    hf = DecoderConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2).to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shape, source = model_shape(ModelConfig(path=str(tmp_path), shape=ModelShape.qwen2_5_7b), BUNDLED_WARMSTART)
    assert shape.num_hidden_layers == 3 and source == str(tmp_path / "config.json")  # the folder wins
    shape, source = model_shape(ModelConfig(path=str(tmp_path / "absent"), shape=ModelShape.qwen2_5_7b),
                                BUNDLED_WARMSTART)
    assert shape.hidden_size == 3584 and "built-in shape qwen2_5_7b" in source
    assert model_shape(ModelConfig(), BUNDLED_WARMSTART)[0].vocab_size == 259  # the warm start a null path trains
    with pytest.raises(ValueError, match="holds no config.json and model.shape is unset"):
        model_shape(ModelConfig(path=str(tmp_path / "absent")), BUNDLED_WARMSTART)


def test_the_plans_pool_is_the_engines_own():
    from actors.engine_factory import build_engine
    from areal_async.planning.memory_plan import pool_blocks
    from areal_async.model.paged_cache import kv_block_bytes

    engine = build_engine("torch", BUNDLED_WARMSTART, "float32", "cpu",
                          settings=EngineConfig(max_slots=64, kv_memory_gib=0.001, kv_block_size=16))
    shape = DecoderConfig.from_hf_dict(json.loads((BUNDLED_WARMSTART / "config.json").read_text()))
    block = kv_block_bytes(shape, 16, torch.float32)
    assert engine.block_bytes == block
    for longest in (20, 100, 250):
        assert engine.pool_blocks(64, longest) == pool_blocks(int(0.001 * GIB), block, 64, longest, 16)
    unbounded = build_engine("torch", BUNDLED_WARMSTART, "float32", "cpu", settings=EngineConfig(max_slots=8))
    assert unbounded.pool_blocks(8, 250) == pool_blocks(None, block, 8, 250, 64) == 8 * 4 + 1


def test_cpu_and_inline_configs_plan_without_gpus():
    config = compose_config("train", [])
    shape, source = model_shape(config.model, BUNDLED_WARMSTART)
    plan = plan_run(config, shape, source, prompt_tokens=16)
    assert plan.fits and plan.gpus == [] and plan.summary == "runs on the CPU: no GPU memory to plan"
    gpu = plan_run(compose_config("gpu_demo", []), shape, source, prompt_tokens=16)
    (budget,) = gpu.gpus
    assert 80 * GIB - budget.used < 2**20 and "fits: the engine decodes" in gpu.summary  # the pool takes the rest


@pytest.mark.parametrize("free_gib,micro_batch,pool_gib", [(78.66, 13_312, 44.57), (139.0, 16_384, 102.50)])
def test_the_seeds_first_stage_fits_an_h100_and_an_h200_with_no_memory_setting(free_gib, micro_batch, pool_gib):
    """Workload (ii) of bench_end_to_end (64 x 16, up to 8,192 new tokens after prompts of 256, bf16) on the memory
    free at start: an H100 80GB's 78.66 GiB (as its run printed, which then trained with 13,312-token micro-batches
    and a 44.57 GiB pool, its measured peak 0.02 GiB under the plan's), an H200's about 139 GiB. The plan lowers the
    micro-batch only where training needs it, and gives generation the rest as KV pool."""
    config = compose_config("train", ["device=cuda", "model.dtype=bfloat16", "rollout.groups_per_step=64",
                                      "generation.group_size=16", "generation.max_new_tokens=8192"])
    plan = inline_gpu_plan(config, R1_1_5B, int(free_gib * GIB), prompt_tokens=256)
    assert plan.micro_batch_tokens == micro_batch
    assert plan.kv_cache / GIB == pytest.approx(pool_gib, abs=0.01)
    assert plan.peak <= free_gib * GIB and plan.sequences == config.engine.max_slots == 256
