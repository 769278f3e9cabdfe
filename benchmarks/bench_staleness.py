"""Throughput and learning of the same RL workload at several staleness bounds, on this machine.

Runs `areal-async train` once per max_staleness value (Ray placement, the same rollout workers and steps)
and reports trajectories consumed per second, wall time, observed staleness and held-out accuracy. Each result
also names its run folder (its metrics.jsonl is what benchmarks/validate_simulate.py reads) and the head start:
the seconds the rollout workers generated before the first training step (the held-out evaluation before RL),
which the training loop's seconds do not count.
Prints a table and writes JSON (default `results/bench_staleness.json`, run from the repository root).

    PYTHONPATH=$PWD python benchmarks/bench_staleness.py --staleness 0 4 --steps 40
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from areal_async.run.cli import compose_config
from areal_async.run.trainer import Trainer
from harness import machine, print_columns, script_parser, write_report


def run_config(max_staleness: int | None, steps: int, workers: int, extra: list[str]):
    """The config of a run: configs/async_cpu.yaml (Ray placement, actors asking for CPU shares that let the
    workers and the learner rank fit a 2-core machine) at `max_staleness`, with `workers` rollout workers."""
    eta = "null" if max_staleness is None else str(max_staleness)
    return compose_config("async_cpu", [f"total_steps={steps}", f"rollout.max_staleness={eta}",
                                        f"cluster.num_rollout_workers={workers}", *extra])


def run_one(max_staleness: int | None, args) -> dict:
    eta = "null" if max_staleness is None else str(max_staleness)
    name = f"bench_staleness_{eta}_{int(time.time())}"
    config = run_config(max_staleness, args.steps, args.workers,
                        [*args.overrides, f"run_name={name}", f"output_dir={args.output_dir}"])
    trainer = Trainer(config)  # its construction ends by starting the rollout workers
    workers_started = time.perf_counter()
    first_step: list[float] = []
    step = trainer.step

    def timed_step(index: int) -> dict:
        if not first_step:
            first_step.append(time.perf_counter())
        return step(index)

    trainer.step = timed_step
    summary = trainer.run(show_progress=False)
    lines = [json.loads(line) for line in (Path(args.output_dir) / config.run_name / "metrics.jsonl").open()]
    train_seconds = sum(line["step_s"] for line in lines)
    trajectories = summary["consumed"] * config.generation.group_size
    return {
        "max_staleness": max_staleness,
        "steps": args.steps,
        "run_dir": str(Path(args.output_dir) / config.run_name),
        "head_start_s": first_step[0] - workers_started,
        "train_loop_seconds": train_seconds,
        "trajectories_consumed": trajectories,
        "trajectories_per_s": trajectories / train_seconds,
        "staleness_max": max(line["staleness_max"] for line in lines),
        "dropped": summary["dropped"],
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "ledger_balanced": summary["ledger_balanced"],
        "rollout_weights_identical": summary["rollout_weights_identical"],
    }


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--staleness", nargs="+", default=["0", "4"], help="values of max_staleness ('null' = unbounded)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--out", default="results/bench_staleness.json", help="JSON file; default: %(default)s")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    results = [run_one(None if s == "null" else int(s), args) for s in args.staleness]
    print_columns([("max_staleness", 13), ("traj/s", 8), ("loop s", 7), ("stale max", 9), ("acc before", 10),
                   ("acc after", 9)],
                  [[str(r["max_staleness"]), f"{r['trajectories_per_s']:.1f}", f"{r['train_loop_seconds']:.1f}",
                    f"{r['staleness_max']:d}", f"{r['accuracy_before']:.3f}", f"{r['accuracy_after']:.3f}"]
                   for r in results])
    write_report({**machine(), "workers": args.workers, "results": results}, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
