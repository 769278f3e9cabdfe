"""Training curves: the moving average against hand values, and `areal-async plot` over several runs."""

import json

import pytest

from areal_async.plots import benchmark_points, heldout_points, moving_average
from areal_async.run.cli import main


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert moving_average([1, 2, 3, 4], 1) == [1, 2, 3, 4]
    assert moving_average([3, 6, 9], 10) == [3, 4.5, 6]
    with pytest.raises(ValueError, match=">= 1"):
        moving_average([1], 0)


def _run(folder, steps, evaluated_every=2):
    folder.mkdir()
    records = []
    for step in range(steps):
        record = {"step": step, "reward_mean": step * 0.5, "response_length_mean": 10 + step,
                  "reward_mean_generated": step * 0.25 if step else None}  # None: no answer was scored
        if (step + 1) % evaluated_every == 0:
            record |= {"heldout_accuracy": 0.5 + 0.01 * step, "eval/gsm8k/pass@1": 0.1 * step,
                       "eval/gsm8k/pass@1_stderr": 0.01}
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"accuracy_before": 0.4, "accuracy_after": 0.7}))
    return records


def test_points_of_the_evaluations(tmp_path):
    records = _run(tmp_path / "a", 4)
    assert heldout_points(records, {"accuracy_before": 0.4, "accuracy_after": 0.7}) == [
        (0, 0.4), (2, 0.51), (4, 0.53), (4, 0.7)]
    assert benchmark_points(records) == {"gsm8k": [(2, pytest.approx(0.1)), (4, pytest.approx(0.3))]}


def test_plot_command_overlays_runs(tmp_path, capsys):
    _run(tmp_path / "a", 6)
    _run(tmp_path / "b", 4)
    out = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--window", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and f"wrote {out}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "training_curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "missing")])
    assert "no metrics.jsonl in" in capsys.readouterr().err
