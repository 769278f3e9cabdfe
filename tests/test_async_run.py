"""The asynchronous application end to end on a CPU: Ray actors, 2 rollout workers, max_staleness 2."""

import json

import numpy as np
import pytest

from areal_async.run.cli import compose_config
from areal_async.actor_system.trajectory_log import read_trajectory_log
from areal_async.run.trainer import run_training

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("async")
    config = compose_config("train", [
        "cluster.placement=ray", "cluster.num_rollout_workers=2", "cluster.num_learner_ranks=2",
        "cluster.cpus_per_learner_rank=0.5", "cluster.cpus_per_rollout_worker=0.5", "rollout.max_staleness=2",
        "rollout.groups_per_step=4", "rollout.groups_per_request=4", "rollout.num_queue_shards=2",
        "total_steps=8", "data.num_heldout=16", "eval.num_samples=2", "reward.num_workers=1",
        "generation.max_new_tokens=12", f"output_dir={out}", "run_name=eta2",
    ])
    try:
        summary = run_training(config, show_progress=False)
    finally:
        ray.shutdown()
    return summary, out / "eta2"


def test_invariants_hold_after_an_asynchronous_run(async_run):
    summary, run_dir = async_run
    assert summary["version"] == 8
    assert summary["ledger_balanced"] and summary["in_flight"] == 0 and summary["queued"] == 0
    assert summary["consumed"] == 8 * 4
    assert [w["version"] for w in summary["workers"]] == [8, 8]
    assert summary["rollout_weights_identical"]  # invariant 3 over the gloo group, after 8 versions
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(line["staleness_max"] <= 2 for line in lines)
    for key in ("staleness_mean", "behaviour_weight_mean", "clip_fraction", "queue_depth", "weight_sync_seconds",
                "generation_tokens_per_s", "training_tokens_per_s"):
        assert key in lines[-1], key


def test_trajectory_log_holds_every_consumed_trajectory_within_the_bound(async_run):
    summary, run_dir = async_run
    rows = [row for shard in sorted((run_dir / "trajectories").iterdir()) for row in read_trajectory_log(shard)]
    assert len(rows) == summary["consumed"] * 8  # the default group size
    for row in rows:
        versions = np.asarray(row["versions"])
        assert versions.min() >= row["consumed_at_step"] - 2  # invariant 1
        assert np.all(np.diff(versions) >= 0)  # versions only move forward within a trajectory
        assert len(versions) == len(row["output_tokens"]) == len(row["behaviour_logprobs"])
