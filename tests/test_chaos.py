"""Faults in a running asynchronous system (CPU, Ray): a rollout worker killed mid-run is replaced and the run
finishes with nothing lost; a killed learner rank stops the run at once, naming it, and resume finishes it."""

import json
import os
import signal
import threading
import time

import pytest

from areal_async.run.cli import compose_config
from areal_async.run.trainer import RunStopped, Trainer

ray = pytest.importorskip("ray")

RUN = ["cluster.placement=ray", "cluster.num_rollout_workers=2", "cluster.cpus_per_learner_rank=0.5",
       "cluster.cpus_per_rollout_worker=0.5", "rollout.max_staleness=2", "rollout.groups_per_step=4",
       "rollout.groups_per_request=2", "rollout.num_queue_shards=2", "data.num_heldout=8", "eval.num_samples=1",
       "reward.num_workers=1", "generation.max_new_tokens=12"]


def _lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _kill_after(trainer: Trainer, steps: int, actor, killed: dict) -> threading.Thread:
    """SIGKILLs `actor`'s process once the run has written `steps` metrics lines."""

    def kill() -> None:
        while len(_lines(trainer.run_dir)) < steps:
            time.sleep(0.05)
        pid = ray.get(actor.pid.remote())
        killed["at"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_killed_rollout_worker_is_replaced_and_the_run_finishes(tmp_path):
    config = compose_config("train", [*RUN, "total_steps=10", f"output_dir={tmp_path}", "run_name=chaos"])
    try:
        trainer = Trainer(config)
        killed = {}
        _kill_after(trainer, 3, trainer.ray_cluster.workers[0], killed)
        summary = trainer.run(show_progress=False)
    finally:
        ray.shutdown()
    assert killed, "the worker was never killed"
    assert summary["version"] == 10 and summary["consumed"] == 10 * 4
    assert summary["ledger_balanced"] and summary["in_flight"] == 0 and summary["queued"] == 0
    assert summary["worker_restarts"] == 1
    assert [w["version"] for w in summary["workers"]] == [10, 10]
    assert summary["rollout_weights_identical"]  # the replacement too
    events = [event for line in _lines(tmp_path / "chaos") for event in line["worker_events"]]
    assert [(e["event"], e["worker"]) for e in events] == [("rollout_worker_replaced", 0)]
    assert "RayActorError" in events[0]["cause"] or "ActorDied" in events[0]["cause"]
    # every group the dead worker held was settled: delivered (the queue had its receipt) or handed out again
    assert events[0]["readmitted"] + events[0]["delivered"] == events[0]["held"] and events[0]["unsettled"] == 0
    assert events[0]["sync_epoch"] == 1


def test_a_killed_learner_rank_stops_the_run_naming_it_and_resume_finishes(tmp_path):
    stage = [*RUN, "cluster.num_learner_ranks=2", "total_steps=8", "checkpoint_every=2", f"output_dir={tmp_path}",
             "run_name=rank"]
    try:
        trainer = Trainer(compose_config("train", stage))
        killed = {}
        _kill_after(trainer, 3, trainer.ray_cluster.learner.ranks[1], killed)
        with pytest.raises(RunStopped, match=r"learner rank 1 died.*step-0000000[24].*resume=true") as stopped:
            trainer.run(show_progress=False)
        assert time.monotonic() - killed["at"] < 30
    finally:
        ray.shutdown()
    assert "learner rank 1" in str(stopped.value)
    try:
        summary = Trainer(compose_config("train", [*stage, "resume=true"])).run(show_progress=False)
    finally:
        ray.shutdown()
    assert summary["version"] == 8 and summary["ledger_balanced"] and summary["rollout_weights_identical"]
    assert [line["version"] for line in _lines(tmp_path / "rank")] == list(range(1, 9))


def test_a_worker_that_keeps_dying_stops_the_run_with_the_cause(tmp_path):
    config = compose_config("train", [*RUN, "total_steps=10", "cluster.max_worker_restarts=0",
                                      f"output_dir={tmp_path}", "run_name=dying"])
    try:
        trainer = Trainer(config)
        _kill_after(trainer, 2, trainer.ray_cluster.workers[1], {})
        with pytest.raises(RunStopped, match=r"rollout worker 1 died .*1 rollout worker deaths within "
                                             r"cluster.worker_restart_window_s=600 exceed cluster.max_worker_restarts=0"):
            trainer.run(show_progress=False)
    finally:
        ray.shutdown()


def test_a_dead_controller_stops_the_run_naming_it(tmp_path):
    config = compose_config("train", [*RUN, "total_steps=10", f"output_dir={tmp_path}", "run_name=controller"])
    try:
        trainer = Trainer(config)

        def kill() -> None:
            while len(_lines(trainer.run_dir)) < 2:
                time.sleep(0.05)
            ray.kill(trainer.ray_cluster.controller_handle)

        threading.Thread(target=kill, daemon=True).start()
        with pytest.raises(RunStopped, match=r"the controller actor died.*wrote no run checkpoint"):
            trainer.run(show_progress=False)
    finally:
        ray.shutdown()
