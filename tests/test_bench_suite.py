"""The benchmark suite: the weight-sync and replay-queue benchmarks in their --quick configuration, and every
benchmark's default output in the ignored results/ folder. Nothing here asserts a speed, only what was measured."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from areal_async.model import CausalLM, DecoderConfig
from areal_async.model.shapes import TINY_BENCHMARK

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_benchmark(name: str, out: Path, *options: str) -> dict:
    """Runs benchmarks/<name>.py with `options` as the suite documents it (from the repository root, which is
    on PYTHONPATH); returns the JSON it wrote to `out`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *options, "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "|---" in result.stdout, f"{name} printed no table:\n{result.stdout[-2000:]}"
    return json.loads(out.read_text())


def tiny_parameter_bytes(dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = CausalLM(DecoderConfig(**TINY_BENCHMARK))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def test_weight_sync_benchmark_publishes_the_whole_model_to_every_receiver(tmp_path: Path) -> None:
    report = run_benchmark("bench_weight_sync", tmp_path / "weight_sync.json", "--quick", "--receivers", "2",
                           "--threads", "1")
    assert report["errors"] == {}
    rows = {row["path"]: row for row in report["results"]}
    assert set(rows) == {"inprocess", "gloo"}
    assert (rows["inprocess"]["receivers"], rows["gloo"]["receivers"]) == (1, 2)
    model_bytes = tiny_parameter_bytes(torch.bfloat16)
    for row in rows.values():
        assert row["model_bytes"] == model_bytes
        assert row["snapshot_bytes_per_receiver"] == row["bytes_per_version"] == model_bytes
        assert row["weights_identical"] is True
        assert [r["kinds"] for r in row["rounds"]] == [["snapshot"], ["delta"], ["delta"]]
        for figure in ("seconds_per_version", "stage_seconds", "transfer_seconds", "snapshot_seconds", "gb_per_s",
                       "aggregate_gb_per_s", "raw_gb_per_s", "checksum_seconds", "checksum_gb_per_s",
                       "floor_seconds_per_version"):
            assert row[figure] > 0, figure
    # both receivers take part in every round, so one broadcast carries each version
    assert rows["gloo"]["publisher_bytes_sent_per_version"] == model_bytes
    assert rows["gloo"]["aggregate_gb_per_s"] == pytest.approx(2 * rows["gloo"]["gb_per_s"])


def test_replay_queue_benchmark_loses_no_frame_on_any_stage(tmp_path: Path) -> None:
    report = run_benchmark("bench_replay_queue", tmp_path / "replay_queue.json", "--quick")
    rows = report["results"]
    assert [row["response_tokens"] for row in rows] == [256, 1024]
    for row in rows:
        groups = report["args"]["groups"]
        assert row["frames_encoded"] == row["frames_decoded"] == row["frames_put"] == row["groups_taken"] == groups
        assert row["trajectories_appended"] == row["trajectories_read"] == groups * row["group_size"]
        assert row["tokens"] == groups * row["group_size"] * (row["prompt_tokens"] + row["response_tokens"])
        assert row["frame_bytes_mean"] > 12 * row["group_size"] * row["response_tokens"]  # raw arrays, no lists
        for stage in ("encode", "decode", "put", "take", "append", "read"):
            assert row[stage]["frames_per_s"] > 0 and row[stage]["mb_per_s"] > 0 and row[stage]["tokens_per_s"] > 0


def default_out(script: Path) -> str:
    """The default of the script's --out option, read from its source."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" \
                and node.args and getattr(node.args[0], "value", None) == "--out":
            return next(ast.literal_eval(k.value) for k in node.keywords if k.arg == "default")
    raise AssertionError(f"{script.name} has no --out option")


def test_every_benchmark_writes_its_json_into_the_ignored_results_folder() -> None:
    scripts = sorted(BENCHMARKS.glob("bench_*.py"))
    assert len(scripts) >= 7
    assert "/results/" in (ROOT / ".gitignore").read_text().split(), "results/ is not in .gitignore"
    for script in scripts:
        assert default_out(script) == f"results/{script.stem}.json", script.name
