"""Training curves of a run folder as a PNG: reward, response length and held-out accuracy against step."""

from __future__ import annotations

import json
from pathlib import Path

CURVES_FILE = "training_curves.png"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(run_dir: Path) -> Path | None:
    """Writes <run_dir>/training_curves.png from metrics.jsonl and summary.json; returns its path (None when
    there is nothing to plot). Held-out accuracy is drawn at step 0 (before RL), at every periodic evaluation
    and after the last step."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        return None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    steps = [r["step"] + 1 for r in records]
    heldout = [(r["step"] + 1, r["heldout_accuracy"]) for r in records if r.get("heldout_accuracy") is not None]
    if summary.get("accuracy_before") is not None:
        heldout.insert(0, (0, summary["accuracy_before"]))
    if summary.get("accuracy_after") is not None:
        heldout.append((steps[-1], summary["accuracy_after"]))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    axes[0].plot(steps, [r["reward_mean"] for r in records])
    axes[0].set(title="reward (training batch)", xlabel="step", ylabel="mean reward")
    axes[1].plot(steps, [r["response_length_mean"] for r in records])
    axes[1].set(title="response length", xlabel="step", ylabel="mean tokens")
    if heldout:
        axes[2].plot(*zip(*heldout), marker="o")
    axes[2].set(title="held-out accuracy (averaged pass@1)", xlabel="step", ylabel="accuracy")
    figure.suptitle(run_dir.name)
    path = run_dir / CURVES_FILE
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
