"""Training curves of run folders as a PNG: reward and response length against step (moving averages), held-out
accuracy and benchmark pass@1 of the periodic evaluations; several runs overlaid, one colour each."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CURVES_FILE = "training_curves.png"
BENCHMARK_PREFIX = "eval/"
BENCHMARK_SUFFIX = "/pass@1"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): [1, 2, 3, 4], 2 -> [1, 1.5, 2.5, 3.5]."""
    if window < 1:
        raise ValueError(f"the moving-average window must be >= 1, got {window}")
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def heldout_points(records: list[dict], summary: dict) -> list[tuple[int, float]]:
    """(step, held-out accuracy): before RL (step 0), every periodic evaluation, and after the last step."""
    points = [(r["step"] + 1, r["heldout_accuracy"]) for r in records if r.get("heldout_accuracy") is not None]
    if summary.get("accuracy_before") is not None:
        points.insert(0, (0, summary["accuracy_before"]))
    if summary.get("accuracy_after") is not None and records:
        points.append((records[-1]["step"] + 1, summary["accuracy_after"]))
    return points


def benchmark_points(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Benchmark name -> (step, pass@1) of its periodic evaluations."""
    points: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(BENCHMARK_PREFIX) and key.endswith(BENCHMARK_SUFFIX):
                name = key[len(BENCHMARK_PREFIX) : -len(BENCHMARK_SUFFIX)]
                points.setdefault(name, []).append((record["step"] + 1, value))
    return points


def plot_runs(run_dirs: Sequence[Path], out: Path, window: int = 1) -> Path | None:
    """Writes `out` (a PNG) with the curves of `run_dirs`; returns it, or None when no run has metrics."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(Path(d))) for d in run_dirs]
    runs = [(d, records) for d, records in runs if records]
    if not runs:
        return None
    benchmarks = sorted({name for _, records in runs for name in benchmark_points(records)})
    agreement = any("agreement_max" in r for _, records in runs for r in records)
    agents = any(r.get("tool_call_rate") is not None for _, records in runs for r in records)
    panels = 3 + bool(benchmarks) + agreement + agents
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    agreement_axes = axes[-1 - agents] if agreement else None
    agent_axes = axes[-1] if agents else None
    smoothed = f" (moving average of {window})" if window > 1 else ""
    for colour, (run_dir, records) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 8, runs):
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        steps = [r["step"] + 1 for r in records]
        label = run_dir.name
        generated = [(r["step"] + 1, r["reward_mean_generated"]) for r in records
                     if r.get("reward_mean_generated") is not None]
        if generated:  # every generated answer: what the policy does; the trained batch is what survived the filter
            axes[0].plot([step for step, _ in generated], moving_average([v for _, v in generated], window),
                         color=colour, label=f"{label}: generated" if len(runs) > 1 else "generated")
        axes[0].plot(steps, moving_average([r["reward_mean"] for r in records], window), color=colour,
                     linestyle="--" if generated else "-",
                     label=(f"{label}: trained" if len(runs) > 1 else "trained") if generated else label)
        axes[1].plot(steps, moving_average([r["response_length_mean"] for r in records], window), color=colour)
        if heldout := heldout_points(records, summary):
            axes[2].plot(*zip(*heldout), marker="o", color=colour)
        if agreement_axes is not None:
            for key, style in (("agreement_max", "-"), ("agreement_mean", ":")):
                points = [(r["step"] + 1, r[key]) for r in records if key in r]
                if points:
                    agreement_axes.plot(*zip(*points), linestyle=style, color=colour,
                                        label=f"{label}: {key[10:]}" if len(runs) > 1 else key[10:])
        if agent_axes is not None:
            for key, style in (("tool_call_rate", "-"), ("turns_per_episode", "--"),
                               ("malformed_tool_calls_per_episode", ":")):
                points = [(r["step"] + 1, r[key]) for r in records if r.get(key) is not None]
                if points:
                    agent_axes.plot([p for p, _ in points], moving_average([v for _, v in points], window),
                                    linestyle=style, color=colour,
                                    label=f"{label}: {key}" if len(runs) > 1 else key.replace("_", " "))
        for style, name in zip(("-", "--", ":", "-."), benchmarks):
            if points := benchmark_points(records).get(name):
                axes[3].plot(*zip(*points), linestyle=style, marker=".", color=colour,
                             label=f"{label}: {name}" if len(runs) > 1 else name)
    axes[0].set(title=f"reward{smoothed}", xlabel="step", ylabel="mean reward")
    axes[1].set(title=f"response length{smoothed}", xlabel="step", ylabel="mean tokens")
    axes[2].set(title="held-out accuracy (averaged pass@1)", xlabel="step", ylabel="accuracy")
    if benchmarks:
        axes[3].set(title="benchmarks (averaged pass@1)", xlabel="step", ylabel="pass@1")
        axes[3].legend(fontsize="small")
    if agreement_axes is not None:
        agreement_axes.set(title="rollout-trainer agreement", xlabel="step",
                           ylabel="|behaviour - proximal logprob|, current version")
        agreement_axes.set_yscale("symlog", linthresh=1e-8)  # mean and max lie decades apart; 0 stays drawable
        agreement_axes.legend(fontsize="small")
    if agent_axes is not None:
        agent_axes.set(title=f"agent episodes{smoothed}", xlabel="step", ylabel="per episode")
        agent_axes.legend(fontsize="small")
    if len(runs) > 1 or any(r.get("reward_mean_generated") is not None for _, records in runs for r in records):
        axes[0].legend(fontsize="small")
    if len(runs) == 1:
        figure.suptitle(runs[0][0].name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_training_curves(run_dir: Path) -> Path | None:
    """<run_dir>/training_curves.png from its metrics.jsonl and summary.json (None when there is nothing yet)."""
    return plot_runs([run_dir], Path(run_dir) / CURVES_FILE)
