"""Kill a CPU run (SIGKILL of its whole process tree) and resume it: versions continue without gaps or
repeats, the ledger balances, and the result equals an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from areal_async.run.cli import compose_config
from areal_async.actor_system.trajectory_log import read_trajectory_log
from areal_async.run.trainer import run_training

RUN = ["total_steps=8", "checkpoint_every=2", "rollout.groups_per_step=4", "generation.group_size=4",
       "data.num_heldout=8", "eval.num_samples=2", "reward.num_workers=1", "ppo.lr=1e-3"]


def _metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _consumed_groups(run_dir):
    rows = list(read_trajectory_log(run_dir / "trajectories" / "shard-0"))
    return [(row["consumed_at_step"], row["group_id"]) for row in rows if row["sample_index"] == 0]


def _kill_then_resume(overrides, tmp_path, startup_s: float) -> tuple[Path, subprocess.CompletedProcess]:
    """Runs `areal-async train` with `overrides` (8 steps) as run "killed", SIGKILLs its whole process group
    (the trainer and its verifier processes) after its 5th metrics line, then resumes it with resume=true.
    Returns the run folder and the resumed process."""
    command = [sys.executable, "-m", "areal_async.run.cli", "train", *overrides, f"output_dir={tmp_path}",
               "run_name=killed", "--no-progress"]
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + startup_s
    while len(_metrics(run_dir)) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 5 <= len(_metrics(run_dir)) < 8

    resumed = subprocess.run([*command, "resume=true"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    return run_dir, resumed


def test_kill_and_resume_continues_exactly(tmp_path):
    run_dir, _ = _kill_then_resume(RUN, tmp_path, startup_s=180)

    lines = _metrics(run_dir)
    assert [line["step"] for line in lines] == list(range(8))
    assert [line["version"] for line in lines] == list(range(1, 9))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ledger_balanced"] and summary["consumed"] == 8 * 4 and summary["version"] == 8
    consumed = _consumed_groups(run_dir)
    assert Counter(step for step, _ in consumed) == {step: 4 for step in range(8)}
    assert len({group for _, group in consumed}) == len(consumed)  # no group trained twice

    config = compose_config("train", [*RUN, f"output_dir={tmp_path}", "run_name=uninterrupted"])
    reference = run_training(config, show_progress=False)
    assert consumed == _consumed_groups(tmp_path / "uninterrupted")
    assert [l["loss"] for l in lines] == [l["loss"] for l in _metrics(tmp_path / "uninterrupted")]
    assert summary["accuracy_after"] == reference["accuracy_after"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from areal_async.errors import InputError

    config = compose_config("train", [*RUN, f"output_dir={tmp_path}", "run_name=fresh", "resume=true"])
    with pytest.raises(InputError, match="no run checkpoint"):
        run_training(config, show_progress=False)
    assert not (tmp_path / "fresh").exists()  # the failed start leaves no folder behind


def test_next_context_stage_continues_with_longer_generations(tmp_path):
    """The seed's 8K -> 16K -> 24K schedule: a stage continues the previous one with one config change."""
    stage = [*RUN, f"output_dir={tmp_path}", "run_name=staged"]
    run_training(compose_config("train", [*stage, "total_steps=4", "generation.max_new_tokens=8"]), show_progress=False)
    summary = run_training(
        compose_config("train", [*stage, "total_steps=6", "generation.max_new_tokens=12", "resume=true"]),
        show_progress=False,
    )
    lines = _metrics(tmp_path / "staged")
    assert [line["version"] for line in lines] == list(range(1, 7)) and summary["ledger_balanced"]
    assert max(line["response_length_mean"] for line in lines[:4]) <= 8
    # the second stage's limit takes effect: its answers (which the first stage cut at 8 tokens) grow past 8
    assert 8 < max(line["response_length_mean"] for line in lines[4:]) <= 12


def test_the_kl_reference_stays_the_starting_policy_across_a_resumed_stage(tmp_path):
    """kl_mode=reward against the base model through context stages: the resumed learner's reference is the
    policy the run started from, not the checkpoint it resumed."""
    import torch

    from areal_async.model import load_pretrained
    from areal_async.run.sft import BUNDLED_WARMSTART
    from areal_async.run.trainer import Trainer

    stage = [*RUN, f"output_dir={tmp_path}", "run_name=kl", "ppo.kl_coef=0.01", "ppo.kl_mode=reward"]
    run_training(compose_config("train", [*stage, "total_steps=2", "generation.max_new_tokens=8"]), show_progress=False)
    trainer = Trainer(compose_config("train", [*stage, "total_steps=4", "generation.max_new_tokens=12", "resume=true"]))
    try:
        base = load_pretrained(BUNDLED_WARMSTART).state_dict()
        reference = trainer.learner.ppo.reference.state_dict()
        policy = trainer.learner.model.state_dict()
        assert all(torch.equal(reference[name].float(), base[name].float()) for name in base)
        assert any(not torch.equal(policy[name].float(), base[name].float()) for name in base)  # it trained
    finally:
        trainer.run(show_progress=False)  # finishes the stage (and stops its reward workers)


RAY_RUN = [*RUN, "cluster.placement=ray", "cluster.num_rollout_workers=1", "cluster.num_learner_ranks=2",
           "cluster.cpus_per_learner_rank=0.5", "cluster.cpus_per_rollout_worker=0.5", "rollout.max_staleness=1"]


def test_kill_and_resume_an_asynchronous_run(tmp_path):
    """Ray placement, 2 learner ranks: the checkpoint is taken while the worker keeps generating. After a
    SIGKILL and a resume the versions and steps continue without gaps or repeats, the ledger balances, no
    group is trained twice, and the worker ends with the learner's weights."""
    pytest.importorskip("ray")
    run_dir, resumed = _kill_then_resume(RAY_RUN, tmp_path, startup_s=300)
    assert "at step 4 " in resumed.stdout  # checkpoints every 2 steps

    lines = _metrics(run_dir)
    assert [line["step"] for line in lines] == list(range(8))
    assert [line["version"] for line in lines] == list(range(1, 9))
    assert all(line["staleness_max"] <= 1 for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ledger_balanced"] and summary["consumed"] == 8 * 4 and summary["version"] == 8
    assert summary["in_flight"] == 0 and summary["queued"] == 0
    assert summary["rollout_weights_identical"] and [w["version"] for w in summary["workers"]] == [8]
    consumed = _consumed_groups(run_dir)
    assert Counter(step for step, _ in consumed) == {step: 4 for step in range(8)}
    assert len({group for _, group in consumed}) == len(consumed)
    # The checkpoints were taken mid-generation: groups in flight or queued (max_staleness 1 lets the
    # worker run a step ahead), which the snapshot must account for.
    states = [json.loads(path.read_text()) for path in (run_dir / "checkpoints/state").glob("step-*/trainer_state.json")]
    assert states and any(state["controller"]["controller"]["in_flight"] or state["queue"][0]["frames"]
                          for state in states)
