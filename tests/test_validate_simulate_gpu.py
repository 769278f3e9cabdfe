"""benchmarks/validate_simulate_gpu.py: the simulator's prediction of the one-GPU end-to-end run from the component
benchmarks' reports, on small hand-made reports (only the keys the readers take) whose step time is worked out
by hand."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from areal_async.planning.memory_plan import GIB
from areal_async.run.cli import compose_config
from areal_async.planning.simulate import LengthModel

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# a decode step of the 16 slots costs 8 ms whatever the cache length; a prefill token 0.5 ms
STEP_S, PREFILL_S = 0.008, 0.0005
# the run: 4 prompts x 4 samples of 16 + 32 tokens (bench_end_to_end's tiny workload i), every request to its limit
REQUESTS, PROMPT, NEW = 16, 16, 32
REWARD_S, SYNC_S = 0.16, 0.05  # per step, the run's own
GENERATION_S = REQUESTS * PROMPT * PREFILL_S + (NEW - 1) * STEP_S  # the first token comes from the prefill
TRAINING_S = 1.0  # 768 trained tokens at 768 tokens/s
STEP = GENERATION_S + REWARD_S + TRAINING_S + SYNC_S  # 0.376 + 0.16 + 1 + 0.05


@pytest.fixture(scope="module")
def validator():
    sys.path.insert(0, str(BENCHMARKS))  # as when the script runs: its folder first
    try:
        yield importlib.import_module("validate_simulate_gpu")
    finally:
        sys.path.remove(str(BENCHMARKS))


def write(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report))
    return path


def generation_report() -> dict:
    """bench_generation at batch 16: 8 ms a step at every KV length, fixed workload 16 x (8 + 64) tokens."""
    args = {"batch": 16, "prompt_len": 8, "new_tokens": 64, "sync_every": 8}
    fixed_s = 63 * STEP_S + 16 * 8 * PREFILL_S
    return {"device": "cuda", "args": args, "results": {
        "step_ms_ours_compiled": {f"graph_b16_kv{kv}": STEP_S * 1e3 for kv in (16, 32, 48, 64)},
        "ours_compiled_fixed": {"requests": 16, "seconds": fixed_s, "tokens_per_s": 16 * 64 / fixed_s},
        "ours_compiled_longtail": {"requests": 64, "tokens_per_s": 1000.0}}}


def end_to_end_report(validator) -> dict:
    """bench_end_to_end's tiny workload i on a GPU, measured 10% slower than the prediction."""
    bench = importlib.import_module("bench_end_to_end")
    nowhere = Path("/nowhere")  # the run's folders: not read
    overrides = bench.run_overrides(bench.TINY_WORKLOADS["i"], nowhere / "model", nowhere / "prompts.jsonl",
                                    nowhere / "runs", "e2e_i", 3, torch.device("cuda"), "bfloat16")
    phases = {"generation_s": 0.4, "reward_s": REWARD_S, "prepare_s": 0.2, "update_s": 0.8,
              "weight_sync_seconds": SYNC_S, "other_s": 0.1}
    return {"args": {"tiny": True}, "device_name": "a test GPU", "gpu_total_bytes": 80 * GIB, "results": {"i": {
        "overrides": overrides, "steps": [{"step": step} for step in range(3)], "timed_steps": 2,
        "step_s": 1.1 * STEP, "phases_s": phases, "trained_tokens_per_step": 768.0}}}


@pytest.fixture
def reports(tmp_path, validator) -> list[str]:
    training = {"results": [{"system": "ours", "workload": "a", "step_kind": "ppo_step", "tokens_per_s": 768.0}]}
    return ["--end-to-end", str(write(tmp_path / "e2e.json", end_to_end_report(validator))),
            "--generation", str(write(tmp_path / "gen.json", generation_report())),
            "--training", str(write(tmp_path / "train.json", training)), "--out", str(tmp_path / "out.json")]


def test_the_prediction_is_the_hand_computed_step(validator, reports, tmp_path, capsys):
    assert validator.main(reports) == 0
    row, = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert row["slots"] == 256 and row["prompt_tokens"] == PROMPT
    assert row["inputs_from_run"] == pytest.approx({"reward_s_per_response": REWARD_S / REQUESTS,
                                                    "weight_sync_s": SYNC_S})
    predicted = row["predicted"]
    assert predicted["generation_s"] == pytest.approx(GENERATION_S)
    assert predicted["training_s"] == pytest.approx(TRAINING_S)
    assert predicted["step_s"] == pytest.approx(STEP)
    assert predicted["trained_tokens_per_step"] == REQUESTS * (PROMPT + NEW)
    assert row["error"]["step_s"] == pytest.approx(1 / 1.1 - 1)
    assert row["within_bar"] == {"step_s": True, "generation_s": True, "training_s": True}
    assert "| " in capsys.readouterr().out


def test_a_missing_key_names_the_file_and_the_key(validator, reports, tmp_path, capsys):
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    del e2e["results"]["i"]["phases_s"]["reward_s"]
    write(tmp_path / "e2e.json", e2e)
    assert validator.main(reports) == 2
    assert "e2e.json: no key results.i.phases_s.reward_s" in capsys.readouterr().err
    del e2e["gpu_total_bytes"]
    write(tmp_path / "e2e.json", e2e)
    assert validator.main(reports) == 2
    assert "e2e.json: no key gpu_total_bytes" in capsys.readouterr().err
    write(tmp_path / "gen.json", {"device": "cuda", "args": {"batch": 16}, "results": {}})
    assert validator.main(reports) == 2
    assert "gen.json: no key results.step_ms_ours_compiled" in capsys.readouterr().err


def test_long_tailed_limits_are_the_workers_distribution(validator):
    config = compose_config("train", ["generation.max_new_tokens=8192", "generation.simulated_length_mean=2048"])
    assert validator.run_lengths(config) == LengthModel(mean=2048, cap=8192, sigma=1.0, low=16)
    fixed = validator.run_lengths(compose_config("train", ["generation.max_new_tokens=32"]))
    assert fixed == LengthModel(mean=32, cap=32, sigma=0.0)
