"""The simulator's inputs (areal_async/planning/simulate_inputs.py): the decode cost fitted from a bench_generation report,
training, publication and scoring rates, a cluster config turned into the simulated system, and errors that name
the report and the key it lacked; and the `areal-async simulate` subcommand that puts them together."""

import json

import pytest
import torch

from areal_async.config import ModelShape
from areal_async.planning.memory_plan import GIB, engine_sequences
from areal_async.model.shapes import known_shape
from areal_async.planning.placement import inline_gpu_plan
from areal_async.run.cli import compose_config, main
from areal_async.run.simulation import GENERATION_REPORT, TRAINING_REPORT, VERIFIER_REPORT
from areal_async.planning.simulate import DecodeCost, EngineModel, LengthModel, Request, call_seconds
from areal_async.planning.simulate_inputs import (
    config_system,
    fit_decode_cost,
    line_fit,
    longtail_requests,
    reward_seconds,
    training_rate,
    weight_sync_seconds,
)

STEP = DecodeCost(fixed_s=0.01, per_slot_s=0.0, per_kv_s=0.0, prefill_token_s=0.0)


def generation_report(fixed_ms: float, slot_ms: float, kv_ms: float, prefill_s: float) -> dict:
    """A bench_generation report written by the engine model itself (batch 4, prompts of 8 tokens)."""
    args = {"batch": 4, "prompt_len": 8, "new_tokens": 64, "hf_new_tokens": 16, "sync_every": 8}
    engine = EngineModel(slots=4, sync_every=8, lookahead=1)
    cost = DecodeCost(fixed_ms / 1e3, slot_ms / 1e3, kv_ms / 1e3, prefill_s)
    table = {f"graph_b4_kv{kv}": fixed_ms + 4 * slot_ms + 4 * kv_ms * kv for kv in (16, 32, 48, 64)}
    fixed = [Request(8, 64, 64)] * 4
    longtail = longtail_requests(16, 8, 64)
    rate = sum(r.length for r in longtail) / call_seconds(longtail, engine, cost)
    return {"device": "cuda", "args": args, "results": {
        "step_ms_ours": table,
        "ours_fixed": {"requests": 4, "seconds": call_seconds(fixed, engine, cost), "tokens_per_s": 0.0},
        "ours_longtail": {"requests": 16, "tokens_per_s": rate}}}


def test_line_fit_by_hand():
    assert line_fit([(0, 1), (1, 3), (2, 5)]) == pytest.approx((1, 2))


def test_the_decode_fit_recovers_the_costs_that_wrote_the_report():
    fit = fit_decode_cost(generation_report(fixed_ms=2.0, slot_ms=0.5, kv_ms=0.01, prefill_s=1e-5), "r.json", "ours")
    assert fit.batch_share == pytest.approx(0.5, abs=1e-6)  # 2 of the 4 ms at batch 4 scale with the batch
    assert fit.cost.fixed_s == pytest.approx(0.002, rel=1e-5)
    assert fit.cost.per_slot_s == pytest.approx(0.0005, rel=1e-5)
    assert fit.cost.per_kv_s == pytest.approx(1e-5)
    assert fit.cost.prefill_token_s == pytest.approx(1e-5)
    assert fit.replay["longtail"]["model"] == pytest.approx(fit.replay["longtail"]["measured"], rel=1e-6)


def test_a_missing_key_names_the_file_and_the_key():
    report = generation_report(2.0, 0.5, 0.01, 1e-5)
    del report["results"]["ours_longtail"]
    with pytest.raises(ValueError, match=r"r\.json: no key results\.ours_longtail"):
        fit_decode_cost(report, "r.json", "ours")
    assert fit_decode_cost(report, "r.json", "ours", batch_share=0.25).batch_share == 0.25
    with pytest.raises(ValueError, match=r"r\.json: no key results\.step_ms_vllm"):
        fit_decode_cost(report, "r.json", "vllm")


def test_training_rate_counts_the_forward_passes_of_the_config():
    report = {"parameters": 10, "results": [{"system": "ours", "workload": "b", "step_kind": "ppo_step",
                                             "tokens_per_s": 6000.0}]}
    recipe = compose_config("recipe_1.5B", [])  # checkpointing and a KL reference: 6 passes against the row's 4
    assert training_rate(report, "t.json", recipe).tokens_per_s == pytest.approx(4000.0)
    plain = compose_config("recipe_1.5B", ["ppo.activation_checkpointing=false", "ppo.kl_coef=0"])
    assert training_rate(report, "t.json", plain).tokens_per_s == pytest.approx(6000.0)
    with pytest.raises(ValueError, match="t.json: no results row with system=ours, workload=a"):
        training_rate(report, "t.json", recipe, workload="a")


def test_publication_and_scoring_seconds():
    assert weight_sync_seconds(3_554_176_000, gb_per_s=20) == pytest.approx(0.1777088)
    report = {"results": [{"path": "nccl", "gb_per_s": 5.0}, {"path": "nccl", "gb_per_s": 8.0},
                          {"path": "gloo", "gb_per_s": 1.0}]}
    assert weight_sync_seconds(8e9, report, "w.json") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="w.json: no results row with path=inprocess"):
        weight_sync_seconds(8e9, report, "w.json", transport="inprocess")
    assert reward_seconds({"args": {"workers": 2}, "throughput": {"responses_per_s": 6000.0}}, "v.json") == 1 / 3000


def test_a_cluster_config_becomes_the_system():
    config = compose_config("recipe_1.5B", ["cluster=n16"])
    model = config_system(config, known_shape(ModelShape.r1_distill_qwen_1_5b), STEP, 1000.0, prompt_tokens=128,
                          lengths=LengthModel(4096, 8192), weight_sync_s=0.2, reward_s=0.0)
    assert (model.rollout_workers, model.learner_ranks, model.groups_per_step, model.group_size) == (96, 32, 1024, 8)
    assert (model.groups_per_request, model.max_staleness, model.queue_capacity) == (16, 4, 16 * 2048)
    assert model.engine == EngineModel(slots=256, sync_every=8, lookahead=1)


def test_an_inline_gpu_config_is_one_engine_and_one_learner_with_the_planned_kv_budget():
    overrides = ["device=cuda", "model.dtype=bfloat16", "generation.max_new_tokens=8192", "engine.max_slots=1024"]
    shape = known_shape(ModelShape.r1_distill_qwen_1_5b)
    systems = {}
    for gib in (84.0, 139.8):
        config = compose_config("train", [*overrides, f"cluster.gpu_memory_gib={gib}"])
        systems[gib] = config_system(config, shape, STEP, 1000.0, prompt_tokens=256, lengths=LengthModel(2048, 8192),
                                     weight_sync_s=0.2, reward_s=0.0)
        # the trainer's pool: what generation leaves of the GPU (the learner's activations are released by then),
        # carrying sequences of 256 + 8192 / 4 tokens expected (36 blocks of 64)
        plan = inline_gpu_plan(config, shape, int(gib * GIB), 256)
        assert systems[gib].engine.slots == engine_sequences(plan.blocks, 1024, 64, 256, 8192, 0.25) == plan.sequences
        assert (systems[gib].rollout_workers, systems[gib].learner_ranks, systems[gib].engine.lookahead) == (1, 1, 1)
        if gib == 84.0:  # the budget binds
            assert systems[gib].engine.slots == (plan.blocks - 1) // 36 < 1024
    assert systems[139.8].engine.slots == 1024
    cpu = config_system(compose_config("train", ["generation.max_new_tokens=8192"]), shape, STEP, 1000.0,
                        prompt_tokens=256, lengths=LengthModel(2048, 8192), weight_sync_s=0.2, reward_s=0.0)
    assert cpu.engine == EngineModel(slots=256, sync_every=8, lookahead=0)  # no budget on a CPU


# ---------------------------------------------------------------------------------------------- the subcommand


def test_simulate_subcommand_writes_its_table_and_json(tmp_path, capsys):
    out = tmp_path / "simulate.json"
    code = main(["simulate", "--config", "recipe_1.5B", "cluster=n1", "generation.max_new_tokens=256",
                 "rollout.groups_per_step=48", "--steps", "4", "--gen-tokens-per-s", "20000",
                 "--train-tokens-per-s", "30000", "--reward-s", "0", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(run["cluster"], run["max_staleness"]) for run in report["runs"]] == [("n1", 0), ("n1", 4)]
    sync, asynchronous = report["runs"]
    assert sync["speedup"] == pytest.approx(1.0)
    assert asynchronous["speedup"] == pytest.approx(sync["step_s"] / asynchronous["step_s"])
    assert sync["steps_for_epochs"] == 8334  # 10 epochs of 40,000 prompts, 48 a step
    assert "speed-up" in capsys.readouterr().out


def test_the_default_reports_are_checked_in():
    """`areal-async simulate` without rate options reads these; replacing a results file must not break it."""
    for report in (GENERATION_REPORT, TRAINING_REPORT, VERIFIER_REPORT):
        assert report.is_file(), report


def test_simulate_subcommand_names_a_missing_report(tmp_path, capsys):
    code = main(["simulate", "--config", "recipe_1.5B", "cluster=n1", "--steps", "2",
                 "--generation-json", str(tmp_path / "none.json")])
    assert code == 2
    assert "none.json: no such benchmark report" in capsys.readouterr().err
