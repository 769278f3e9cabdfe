"""`areal-async ablate`: the grid's cells and manifest, aggregation over seeds and the table against hand-computed
numbers, the grid files' configurations, and a tiny grid end to end (inline placement) that is interrupted and
resumed."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from areal_async.checkpointing import LATEST, TRAINER_STATE
from areal_async.run.ablate import (
    Cell,
    CellResult,
    cell_state,
    format_table,
    grid_cells,
    open_grid,
    read_cell_result,
    shared_overrides,
    spread,
    staleness_positions,
    summarise,
)
from areal_async.run.cli import compose_config, main
from areal_async.actor_system.staleness import parse_staleness
from areal_async.run.trainer import validate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_spread_is_mean_and_sample_standard_deviation():
    value = spread([0.6, 0.7, 0.8])
    assert value.mean == pytest.approx(0.7) and value.std == pytest.approx(0.1) and value.n == 3
    assert spread([0.5]).std is None
    with pytest.raises(ValueError):
        spread([])


def _result(eta, objective, seed, accuracy, throughput, staleness_mean, staleness_max):
    return CellResult(Cell(eta, objective, seed), 0.5, accuracy, throughput, staleness_mean, staleness_max)


RESULTS = [
    _result(None, "naive", 1, 0.36, 300.0, 6.5, 12),
    _result(4, "naive", 1, 0.60, 210.0, 2.5, 4),
    _result(4, "decoupled", 2, 0.71, 220.0, 3.0, 3),
    _result(0, "decoupled", 1, 0.70, 100.0, 0.0, 0),
    _result(0, "naive", 1, 0.72, 105.0, 0.0, 0),
    _result(4, "decoupled", 1, 0.69, 200.0, 2.0, 4),
    _result(0, "decoupled", 2, 0.74, 110.0, 0.0, 0),
]


def test_summarise_groups_seeds_orders_settings_and_compares_with_staleness_0():
    rows = summarise(RESULTS)
    assert [(r.max_staleness, r.objective) for r in rows] == [
        (0, "decoupled"), (0, "naive"), (4, "decoupled"), (4, "naive"), (None, "naive")]
    synchronous, _, stale, naive_stale, unbounded = rows  # std: ((0.70 - 0.72)² + (0.74 - 0.72)²) / (2 - 1)
    assert synchronous.accuracy.mean == pytest.approx(0.72) and synchronous.accuracy.std == pytest.approx(0.0008 ** 0.5)
    assert synchronous.trajectories_per_s.mean == pytest.approx(105.0)
    assert synchronous.trajectories_per_s.std == pytest.approx(50 ** 0.5)  # ((100 - 105)² + (110 - 105)²) / 1
    assert stale.accuracy.n == 2 and stale.relative_accuracy == pytest.approx(0.70 / 0.72)
    assert stale.staleness_mean.mean == pytest.approx(2.5) and stale.staleness_max == 4
    assert naive_stale.relative_accuracy == pytest.approx(0.60 / 0.72)  # naive's own max_staleness 0: 0.72
    assert unbounded.relative_accuracy == pytest.approx(0.5) and unbounded.accuracy.std is None
    assert summarise([RESULTS[1]])[0].relative_accuracy is None  # no max_staleness 0 to compare with


def test_format_table():
    assert format_table(summarise(RESULTS)) == (
        "| max_staleness | objective | seeds | held-out accuracy | vs. max_staleness 0 | trajectories/s "
        "| staleness mean | staleness max |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| 0 | decoupled | 2 | 0.720 ± 0.028 | 100.0% | 105.0 ± 7.1 | 0.00 ± 0.00 | 0 |\n"
        "| 0 | naive | 1 | 0.720 | 100.0% | 105.0 | 0.00 | 0 |\n"
        "| 4 | decoupled | 2 | 0.700 ± 0.014 | 97.2% | 210.0 ± 14.1 | 2.50 ± 0.71 | 4 |\n"
        "| 4 | naive | 1 | 0.600 | 83.3% | 210.0 | 2.50 | 4 |\n"
        "| unbounded | naive | 1 | 0.360 | 50.0% | 300.0 | 6.50 | 12 |\n"
    )


def test_staleness_positions_put_unbounded_at_the_right_end():
    assert staleness_positions([4, None, 0, 16, 4]) == {0: 0.0, 4: 1.0, 16: 2.0, None: 3.0}


def test_parse_staleness():
    assert parse_staleness("0") == 0 and parse_staleness("16") == 16
    assert parse_staleness("unbounded") is None and parse_staleness("null") is None
    for bad in ("-1", "four", "2.5"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            parse_staleness(bad)


def test_cells_and_their_overrides():
    cells = grid_cells([0, None], ["decoupled", "naive"], [1, 2])
    assert [c.name for c in cells[:4]] == ["staleness_0-decoupled-seed_1", "staleness_0-naive-seed_1",
                                            "staleness_unbounded-decoupled-seed_1", "staleness_unbounded-naive-seed_1"]
    assert len(cells) == 8 and cells[4].seed == 2
    assert cells[2].overrides() == ["rollout.max_staleness=null", "ppo.objective=decoupled", "seed=1"]


def test_shared_overrides_refuse_what_the_grid_sets():
    assert shared_overrides(["a.b=1"], ["c=2"], 40) == ["a.b=1", "c=2", "total_steps=40"]
    assert shared_overrides(["a.b=1"], [], None) == ["a.b=1"]
    for override in ("rollout.max_staleness=3", "+seed=2", "total_steps=5", "output_dir=/x"):
        with pytest.raises(ValueError, match=override.partition("=")[0].lstrip("+")):
            shared_overrides([], [override], None)


def test_open_grid_records_cells_and_refuses_other_settings(tmp_path):
    first, second = Cell(0, "decoupled", 1), Cell(None, "naive", 2)
    open_grid(tmp_path, "async_cpu", ["a=1"], [first])
    manifest = open_grid(tmp_path, "async_cpu", ["a=1"], [second])
    assert manifest == json.loads((tmp_path / "ablation.json").read_text())
    assert list(manifest["cells"]) == [first.name, second.name]
    assert manifest["cells"][second.name] == {"max_staleness": None, "objective": "naive", "seed": 2, "overrides": [
        "a=1", "rollout.max_staleness=null", "ppo.objective=naive", "seed=2"]}
    with pytest.raises(ValueError, match=r"overrides: the folder has \['a=1'\], this call asks for \['a=2'\]"):
        open_grid(tmp_path, "async_cpu", ["a=2"], [first])
    with pytest.raises(ValueError, match="base_config"):
        open_grid(tmp_path, "train", ["a=1"], [first])


def test_cell_state(tmp_path):
    run = tmp_path / "run"
    assert cell_state(run) == "new"
    run.mkdir()
    assert cell_state(run) == "restart"
    state = run / "checkpoints" / "state"
    state.mkdir(parents=True)
    (state / LATEST).write_text("step-00000002")
    assert cell_state(run) == "restart"  # the pointer names a checkpoint that was never completed
    (state / "step-00000002").mkdir()
    (state / "step-00000002" / TRAINER_STATE).write_text("{}")
    assert cell_state(run) == "resume"
    (run / "summary.json").write_text("{}")
    assert cell_state(run) == "done"


def test_read_cell_result(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"accuracy_before": 0.5, "accuracy_after": 0.625,
                                                       "consumed": 6}))
    OmegaConf.save(OmegaConf.create({"generation": {"group_size": 4}}), tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "step_s": 2.0, "staleness_mean": 0.0, "staleness_max": 0}\n'
        '{"step": 1, "step_s": 4.0, "staleness_mean": 1.0, "staleness_max": 2}\n')
    result = read_cell_result(Cell(2, "naive", 1), tmp_path)
    assert result.trajectories_per_s == pytest.approx(6 * 4 / 6.0)
    assert (result.accuracy_before, result.accuracy_after) == (0.5, 0.625)
    assert result.staleness_mean == pytest.approx(0.5) and result.staleness_max == 2
    assert read_cell_result(Cell(2, "naive", 1), tmp_path / "missing") is None


@pytest.mark.parametrize("grid_name, placement, steps, settings", [("cpu", "ray", 40, 14), ("gpu", "inline", 60, 12)])
def test_every_run_of_the_grid_files_is_a_valid_configuration(grid_name, placement, steps, settings):
    grid = compose_config(f"ablation/{grid_name}", [])
    cells = grid_cells(grid.max_staleness, [o.value for o in grid.objectives], grid.seeds)
    assert len(cells) == settings * len(grid.seeds)
    shared = shared_overrides(grid.overrides, [], grid.steps)
    for cell in cells:
        config = compose_config(grid.base_config, [*shared, *cell.overrides()])
        validate(config)
        assert config.rollout.max_staleness == cell.max_staleness and config.ppo.objective.value == cell.objective
        assert config.seed == cell.seed and config.total_steps == steps
        assert config.cluster.placement.value == placement
    if grid_name == "cpu":  # 2 rollout workers with 0.5 CPU each, the learner 0.5 CPU
        cluster = config.cluster
        assert (cluster.num_rollout_workers, cluster.cpus_per_rollout_worker, cluster.cpus_per_learner_rank) == (
            2, 0.5, 0.5)
        assert None in grid.max_staleness


def test_bad_command_lines_name_the_bad_input(tmp_path, capsys):
    assert main(["ablate", "--staleness", "3", "--out", str(tmp_path)]) == 2
    assert "--staleness 3: not in the grid cpu (0 1 2 4 8 16 unbounded)" in capsys.readouterr().err
    assert main(["ablate", "--staleness", "four", "--out", str(tmp_path)]) == 2
    assert "'four'" in capsys.readouterr().err
    assert main(["ablate", "--objectives", "ppo", "--out", str(tmp_path)]) == 2
    assert "--objectives ppo: not in the grid cpu" in capsys.readouterr().err
    assert main(["ablate", "ppo.objective=naive", "--out", str(tmp_path)]) == 2
    assert "the grid sets ppo.objective" in capsys.readouterr().err
    assert main(["ablate", "ppo.lr=fast", "--staleness", "0", "--out", str(tmp_path)]) == 2
    assert "ppo.lr" in capsys.readouterr().err
    assert not (tmp_path / "ablation.json").exists()  # nothing started
    with pytest.raises(SystemExit):
        main(["ablate", "--report", str(tmp_path)])
    assert "no ablation.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate", "--report", str(tmp_path), "--seeds", "1"])
    assert "--report" in capsys.readouterr().err


TINY = ["cluster.placement=inline", "rollout.groups_per_step=4", "generation.group_size=4", "data.num_heldout=8",
        "eval.num_samples=2", "reward.num_workers=1", "ppo.lr=1e-3", "checkpoint_every=2"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_grid_runs_resumes_and_reports(tmp_path, capsys):
    """Two cells of 3 steps (a run checkpoint after step 2). One cell's folder holds what a run killed before its
    first checkpoint leaves: it runs again from nothing. Then the other is cut after its checkpoint: the next call
    skips the finished cell and resumes that one, which ends as it did uninterrupted (inline runs are
    deterministic)."""
    grid = tmp_path / "grid"
    command = ["ablate", "--staleness", "0", "1", "--objectives", "decoupled", "--seeds", "1", "--steps", "3",
               "--out", str(grid), *TINY]
    synchronous, stale = grid / "staleness_0-decoupled-seed_1", grid / "staleness_1-decoupled-seed_1"
    synchronous.mkdir(parents=True)
    (synchronous / "metrics.jsonl").write_text('{"step": 0, "loss": 0.0}\n')

    assert main(command) == 0
    out = capsys.readouterr().out
    assert "[1/2] staleness_0-decoupled-seed_1: stopped before its first run checkpoint, running again" in out
    assert "[2/2] staleness_1-decoupled-seed_1: running" in out
    assert "[2/2] staleness_1-decoupled-seed_1: done in" in out
    assert [line["step"] for line in _metrics(synchronous)] == [0, 1, 2]  # the stale lines were cleared
    assert max(line["staleness_max"] for line in _metrics(stale)) <= 1
    manifest = json.loads((grid / "ablation.json").read_text())
    assert manifest["base_config"] == "async_cpu"
    assert manifest["cells"][stale.name]["overrides"][-3:] == ["rollout.max_staleness=1", "ppo.objective=decoupled",
                                                               "seed=1"]
    assert "total_steps=3" in manifest["overrides"] and "cluster.placement=inline" in manifest["overrides"]
    table = (grid / "ablation.md").read_text()
    assert "| 0 | decoupled | 1 |" in table and "| 1 | decoupled | 1 |" in table and "2 of 2 runs finished" in table
    assert (grid / "ablation.png").read_bytes()[:8] == PNG_MAGIC

    uninterrupted = json.loads((stale / "summary.json").read_text())
    losses = [line["loss"] for line in _metrics(stale)]
    finished_at = (synchronous / "summary.json").stat().st_mtime_ns
    (stale / "summary.json").unlink()  # killed in its last step: after the checkpoint of step 2, before the end
    shutil.rmtree(stale / "checkpoints" / "final")
    (stale / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in _metrics(stale)[:2]))

    assert main(command) == 0
    out = capsys.readouterr().out
    assert "[1/2] staleness_0-decoupled-seed_1: finished earlier, skipped" in out
    assert "[2/2] staleness_1-decoupled-seed_1: resuming from its last run checkpoint" in out
    assert "at step 2 " in (stale / "train.log").read_text()
    assert (synchronous / "summary.json").stat().st_mtime_ns == finished_at
    assert [line["loss"] for line in _metrics(stale)] == losses
    assert json.loads((stale / "summary.json").read_text())["accuracy_after"] == uninterrupted["accuracy_after"]

    report = (grid / "ablation.md").read_text()
    (grid / "ablation.md").unlink()
    (grid / "ablation.png").unlink()
    assert main(["ablate", "--report", str(grid)]) == 0
    assert (grid / "ablation.md").read_text() == report
    assert (grid / "ablation.png").read_bytes()[:8] == PNG_MAGIC
