"""The staleness ablation (`areal-async ablate`): a grid of training runs, max_staleness x objective x seed, each a
normal run folder under one grid folder, and a report over seeds: a Markdown table and a PNG.

The grid folder's ablation.json records the base config, the overrides every run shares and each cell's own, so
the report (and any single run) can be made again from the folder alone. Calling the same grid again resumes it:
a cell whose run wrote summary.json is done; a cell that stopped mid-run continues from its last run checkpoint
(resume=true, which both placements support), or starts again from nothing when it wrote none.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from areal_async.checkpointing import latest_run_checkpoint
from areal_async.config import Objective
from areal_async.files import write_json_atomically, write_text_atomically
from areal_async.actor_system.staleness import staleness_label

MANIFEST_FILE = "ablation.json"
TABLE_FILE = "ablation.md"
PLOT_FILE = "ablation.png"
LOG_FILE = "train.log"
# What the grid sets for each cell itself; as a shared override it would be overwritten or break the resume.
CELL_KEYS = ("rollout.max_staleness", "ppo.objective", "seed", "total_steps", "run_name", "output_dir", "resume")


def chosen(option: str, given: Sequence | None, grid_values: Sequence, grid: str,
           label: Callable[[object], str] = str) -> list:
    """The values a command-line `option` picks from the grid file `grid`'s `grid_values` (all of them when it
    picks none), without repeats; a value the grid lacks is a ValueError that names it."""
    if not given:
        return list(grid_values)
    unknown = [label(value) for value in given if value not in grid_values]
    if unknown:
        raise ValueError(f"{option} {' '.join(unknown)}: not in the grid {grid} "
                         f"({' '.join(label(value) for value in grid_values)})")
    return list(dict.fromkeys(given))


@dataclass(frozen=True)
class Cell:
    max_staleness: int | None
    objective: str  # an Objective's value
    seed: int

    @property
    def name(self) -> str:
        """The run folder's name: staleness_4-naive-seed_1."""
        return f"staleness_{staleness_label(self.max_staleness)}-{self.objective}-seed_{self.seed}"

    def overrides(self) -> list[str]:
        eta = "null" if self.max_staleness is None else str(self.max_staleness)
        return [f"rollout.max_staleness={eta}", f"ppo.objective={self.objective}", f"seed={self.seed}"]


def grid_cells(max_staleness: Sequence[int | None], objectives: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """Every combination, seed by seed: an interrupted grid has covered each setting once before it repeats any."""
    return [Cell(eta, objective, seed) for seed in seeds for eta in max_staleness for objective in objectives]


def shared_overrides(grid_overrides: Sequence[str], extra: Sequence[str], steps: int | None) -> list[str]:
    """The overrides every cell runs with: the grid file's, then the command line's, then total_steps."""
    for override in extra:
        key = override.partition("=")[0].lstrip("+~")
        if key in CELL_KEYS:
            raise ValueError(f"override {override!r}: the grid sets {key} for each run (use --staleness, "
                             "--objectives, --seeds, --steps, --out)")
    return [*grid_overrides, *extra, *([f"total_steps={steps}"] if steps is not None else [])]


def open_grid(grid_dir: Path, base_config: str, shared: Sequence[str], cells: Sequence[Cell]) -> dict:
    """Reads (or starts) the grid folder's manifest, adds `cells` with their overrides and writes it back. A folder
    made with another base config or other shared overrides is refused: its runs would not be comparable."""
    path = Path(grid_dir) / MANIFEST_FILE
    manifest = {"base_config": base_config, "overrides": list(shared), "cells": {}}
    if path.is_file():
        manifest = json.loads(path.read_text())
        differences = [f"{key}: the folder has {manifest[key]}, this call asks for {value}"
                       for key, value in (("base_config", base_config), ("overrides", list(shared)))
                       if manifest[key] != value]
        if differences:
            raise ValueError(f"{grid_dir} holds a grid with other settings ({'; '.join(differences)}): "
                             "run with those settings to extend it, or choose another --out")
    for cell in cells:
        manifest["cells"][cell.name] = {"max_staleness": cell.max_staleness, "objective": cell.objective,
                                        "seed": cell.seed, "overrides": [*shared, *cell.overrides()]}
    write_json_atomically(path, manifest)
    return manifest


def read_manifest(grid_dir: Path) -> dict:
    path = Path(grid_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{grid_dir} is not an ablation grid folder (no {MANIFEST_FILE})")
    return json.loads(path.read_text())


def cell_state(run_dir: Path) -> str:
    """'done' (summary.json written), 'resume' (stopped after a run checkpoint), 'restart' (stopped before one,
    or with a damaged one) or 'new'."""
    if (run_dir / "summary.json").is_file():
        return "done"
    if not run_dir.exists():
        return "new"
    try:
        return "resume" if latest_run_checkpoint(run_dir / "checkpoints" / "state") else "restart"
    except FileNotFoundError:  # the checkpoint pointer names an incomplete folder
        return "restart"


def train_command(base_config: str, overrides: Sequence[str], grid_dir: Path, name: str, resume: bool) -> list[str]:
    return [sys.executable, "-m", "areal_async.run.cli", "train", "--config", base_config, *overrides,
            f"output_dir={grid_dir}", f"run_name={name}", *(["resume=true"] if resume else []), "--no-progress"]


def run_grid(grid_dir: Path, manifest: dict, cells: Sequence[Cell], log: Callable[[str], None] = print) -> list[str]:
    """Runs `cells` one after another, each `areal-async train` in a process of its own (its output in the run
    folder's train.log), skipping finished ones and resuming interrupted ones. Returns the cells that failed."""
    failed = []
    for index, cell in enumerate(cells, start=1):
        prefix = f"[{index}/{len(cells)}] {cell.name}:"
        run_dir = Path(grid_dir) / cell.name
        state = cell_state(run_dir)
        if state == "done":
            log(f"{prefix} finished earlier, skipped")
            continue
        if state == "restart":  # the trainer appends to what it finds: start from an empty folder
            shutil.rmtree(run_dir)
        log(f"{prefix} " + {"new": "running", "restart": "stopped before its first run checkpoint, running again",
                            "resume": "resuming from its last run checkpoint"}[state])
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        command = train_command(manifest["base_config"], manifest["cells"][cell.name]["overrides"], grid_dir,
                                cell.name, resume=state == "resume")
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as output:
            code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - started
        result = read_cell_result(cell, run_dir) if code == 0 else None
        if result is None:
            failed.append(cell.name)
            log(f"{prefix} failed after {seconds:.0f} s (exit code {code}); its output is in {run_dir / LOG_FILE}")
        else:
            log(f"{prefix} done in {seconds:.0f} s: held-out accuracy {result.accuracy_after:.3f}, "
                f"{result.trajectories_per_s:.1f} trajectories/s")
    return failed


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    accuracy_before: float
    accuracy_after: float
    trajectories_per_s: float  # trained trajectories per second of the training loop (no start-up, no evaluation)
    staleness_mean: float  # of the trained trajectories, in versions, averaged over steps
    staleness_max: int


def read_cell_result(cell: Cell, run_dir: Path) -> CellResult | None:
    """The finished run's figures (None when it has not finished)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    group_size = OmegaConf.load(run_dir / "config.yaml").generation.group_size
    return CellResult(
        cell=cell,
        accuracy_before=summary["accuracy_before"],
        accuracy_after=summary["accuracy_after"],
        trajectories_per_s=summary["consumed"] * group_size / sum(line["step_s"] for line in lines),
        staleness_mean=sum(line["staleness_mean"] for line in lines) / len(lines),
        staleness_max=max(line["staleness_max"] for line in lines),
    )


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float | None  # the sample standard deviation (n - 1); None for a single value
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation: [0.6, 0.7, 0.8] -> 0.7 ± 0.1."""
    if not values:
        raise ValueError("spread of no values")
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class Row:
    """One setting of the grid over its seeds."""

    max_staleness: int | None
    objective: str
    accuracy: Spread
    relative_accuracy: float | None  # mean accuracy / the same objective's at max_staleness 0 (None without it)
    trajectories_per_s: Spread
    staleness_mean: Spread
    staleness_max: int  # over every seed's steps


def staleness_order(max_staleness: int | None) -> tuple[bool, int]:
    """Sort key: bounds ascending, unbounded last."""
    return (max_staleness is None, max_staleness or 0)


def summarise(results: Sequence[CellResult]) -> list[Row]:
    """One row per (max_staleness, objective) with results, over its seeds, in staleness then objective order."""
    settings: dict[tuple[int | None, str], list[CellResult]] = {}
    for result in results:
        settings.setdefault((result.cell.max_staleness, result.cell.objective), []).append(result)
    objective_order = [objective.value for objective in Objective]
    keys = sorted(settings, key=lambda key: (staleness_order(key[0]), objective_order.index(key[1])))
    synchronous = {objective: spread([r.accuracy_after for r in cells]).mean
                   for (eta, objective), cells in settings.items() if eta == 0}
    rows = []
    for eta, objective in keys:
        cells = settings[(eta, objective)]
        accuracy = spread([r.accuracy_after for r in cells])
        reference = synchronous.get(objective)
        rows.append(Row(
            max_staleness=eta,
            objective=objective,
            accuracy=accuracy,
            relative_accuracy=accuracy.mean / reference if reference else None,
            trajectories_per_s=spread([r.trajectories_per_s for r in cells]),
            staleness_mean=spread([r.staleness_mean for r in cells]),
            staleness_max=max(r.staleness_max for r in cells),
        ))
    return rows


def format_spread(value: Spread, digits: int) -> str:
    return f"{value.mean:.{digits}f}" + ("" if value.std is None else f" ± {value.std:.{digits}f}")


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| max_staleness | objective | seeds | held-out accuracy | vs. max_staleness 0 | trajectories/s "
             "| staleness mean | staleness max |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        relative = "" if row.relative_accuracy is None else f"{100 * row.relative_accuracy:.1f}%"
        lines.append(f"| {staleness_label(row.max_staleness)} | {row.objective} | {row.accuracy.n} "
                     f"| {format_spread(row.accuracy, 3)} | {relative} | {format_spread(row.trajectories_per_s, 1)} "
                     f"| {format_spread(row.staleness_mean, 2)} | {row.staleness_max} |")
    return "\n".join(lines) + "\n"


def staleness_positions(values: Sequence[int | None]) -> dict[int | None, float]:
    """x positions of the plot: the bounds evenly spaced in ascending order, unbounded one further right."""
    return {eta: float(index) for index, eta in enumerate(sorted(set(values), key=staleness_order))}


def plot_rows(rows: Sequence[Row], out: Path) -> Path:
    """Held-out accuracy and trajectories/s against max_staleness, one line per objective, error bars of one
    standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    positions = staleness_positions([row.max_staleness for row in rows])
    objectives = list(dict.fromkeys(row.objective for row in rows))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for offset_index, objective in enumerate(objectives):
        mine = [row for row in rows if row.objective == objective]
        offset = 0.06 * (offset_index - (len(objectives) - 1) / 2)  # the error bars of two lines side by side
        x = [positions[row.max_staleness] + offset for row in mine]
        for axis, field in zip(axes, ("accuracy", "trajectories_per_s")):
            values = [getattr(row, field) for row in mine]
            axis.errorbar(x, [v.mean for v in values], yerr=[v.std or 0.0 for v in values], marker="o", capsize=3,
                          label=objective)
    for axis, title, label in ((axes[0], "held-out accuracy after training", "averaged pass@1"),
                               (axes[1], "training throughput", "trained trajectories / s")):
        axis.set(title=title, xlabel="max_staleness", ylabel=label)
        axis.set_xticks(list(positions.values()), [staleness_label(eta) for eta in positions])
        axis.legend()
    figure.suptitle("staleness ablation (mean ± sample standard deviation over seeds)")
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def write_report(grid_dir: Path) -> str:
    """ablation.md (the table, what it measures, which runs are missing) and ablation.png in the grid folder, from
    its manifest and the runs that finished. Returns the Markdown."""
    grid_dir = Path(grid_dir)
    manifest = read_manifest(grid_dir)
    results, missing = [], []
    for name, entry in manifest["cells"].items():
        cell = Cell(entry["max_staleness"], entry["objective"], entry["seed"])
        result = read_cell_result(cell, grid_dir / name)
        if result is None:
            missing.append(name)
        else:
            results.append(result)
    rows = summarise(results)
    before = spread([r.accuracy_before for r in results]).mean if results else None
    lines = [
        f"# Staleness ablation: {grid_dir.name}",
        "",
        f"Each run: `areal-async train --config {manifest['base_config']} {' '.join(manifest['overrides'])}` with "
        f"its max_staleness, objective and seed; {len(results)} of {len(manifest['cells'])} runs finished.",
        "",
        "Held-out accuracy: averaged pass@1 after the last step"
        + ("" if before is None else f" (before RL: {before:.3f})")
        + "; vs. max_staleness 0: its mean over the same objective's at max_staleness 0. Trajectories/s: trained "
        "trajectories per second of the training loop (start-up and held-out evaluation excluded). Staleness: of "
        "the trained trajectories' oldest token, in versions, observed. Mean ± sample standard deviation over seeds.",
        "",
        format_table(rows),
    ]
    if missing:
        lines += [f"Not finished: {', '.join(missing)}.", ""]
    text = "\n".join(lines)
    write_text_atomically(grid_dir / TABLE_FILE, text)
    if rows:
        plot_rows(rows, grid_dir / PLOT_FILE)
    return text
