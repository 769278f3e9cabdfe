"""Checks `areal-async simulate` against measured runs on this machine: the CPU Ray runs of bench_staleness.py.

The machine is shared: what a process gets of its 2 cores changes from minute to minute, so a rate measured in
one run does not hold for the next. The simulator's component rates are therefore read from each measured run's
own metrics.jsonl (what its learner and its workers did), and the simulator predicts what those make of the
whole system: the overlap of generation and training, the staleness rule, the publish rounds, the queue, idle
time; that is, each run's trajectories/s and seconds per step.

Inputs of a run (its metrics.jsonl from the second step on, and its trajectory log):
- the learner's trained tokens/s (trained_tokens over train_s) and the publish round (weight_sync_seconds);
- a rollout worker's generation rate (generated tokens over generation_s, whatever the batch) and its scoring
  time per response (reward_s); the share of groups dropped as zero-variance (groups_dropped);
- prompt and response lengths (a log-normal fitted to the responses); the workers' head start (head_start_s of
  the report: the held-out evaluation before the first step).
Host overheads:
- measured here through a controller and a queue shard actor that nothing else calls: host_s, a worker-like Ray
  task delivering groups (encode, queue put, controller delivered), and take_s, the driver taking them (the
  queue's take, which writes the trajectory log, and the controller's free_slots), per group;
- host_polled_s, a worker's time to deliver a group while the learner polls for its step's groups (the trainer's
  polls keep the same actors busy): the value with which the simulated synchronous run (max_staleness 0 of the
  report, or `--calibration-run`) gathers as long as it measured. That run's gather_s is thus matched by
  construction and its row checks the rest; the asynchronous rows are the prediction.
A second prediction takes every rate from the synchronous run: the difference shows how far the load moved.

    PYTHONPATH=$PWD python benchmarks/bench_staleness.py --staleness 0 4 --steps 40 --out results/bench_staleness.json
    PYTHONPATH=$PWD python benchmarks/validate_simulate.py --measured results/bench_staleness.json

Overrides after the options are those given to bench_staleness.py (the simulated configs take them too). Prints
a table and writes JSON (default `results/validate_simulate.json`). The one-GPU check, against
bench_end_to_end.py's run with the GPU component reports' rates, is benchmarks/validate_simulate_gpu.py.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from areal_async.actor_system.controller import RolloutController
from areal_async.data.records import PromptRecord
from areal_async.planning.placement import model_shape
from areal_async.actor_system.replay_queue import ReplayQueueShard, ShardedReplayQueue
from areal_async.run.sft import BUNDLED_WARMSTART
from areal_async.actor_system.runtime import ControllerService, RayProxy
from areal_async.planning.simulate import LengthModel, StepRecord, simulate
from areal_async.planning.simulate_inputs import config_system, decode_cost_from_rate
from areal_async.actor_system.trajectory_log import read_trajectory_log
from areal_async.types import Trajectory
from areal_async.actor_system.wire import encode_group
from bench_staleness import run_config  # benchmarks/: the script's folder, first on sys.path
from harness import print_columns, script_parser, write_report

BAR = 0.15  # the bar: predictions within 15% of what runs
HOST_GROUPS = 32
HOST_REPEATS = 3
FIT_ITERATIONS = 30


def host_seconds(groups: int = HOST_GROUPS, repeats: int = HOST_REPEATS) -> dict[str, float]:
    """Seconds per group, the best of `repeats`, through a controller and a queue shard actor (with its trajectory
    log, as in a run) that nothing else calls: host_s, a worker-like Ray task admitting `groups` groups of 8 answers
    of 12 tokens and delivering each (encode, queue put, controller delivered); take_s, the driver taking them for
    a step (the queue's take, which logs them, and the controller's free_slots)."""
    import ray

    ray.init(include_dashboard=False)
    records = [PromptRecord(f"q{i}", "Q: 1+1\nA: ", ("2",)) for i in range(groups * repeats)]
    controller = RayProxy(ray.remote(num_cpus=0)(ControllerService).remote(
        RolloutController(records, lambda text: [1] * 12, 8, groups, None, seed=0)), "controller")
    with tempfile.TemporaryDirectory() as log_dir:
        shard = ray.remote(num_cpus=0)(ReplayQueueShard).remote(0, groups * repeats, None, Path(log_dir) / "shard-0")
        queue = ShardedReplayQueue.over([RayProxy(shard, "queue shard")])

        @ray.remote(num_cpus=0)
        def deliver(controller, queue) -> float:
            started = time.perf_counter()
            for group in controller.admit_groups(groups, worker=0):
                answers = [Trajectory(group.query_id, group.group_id, index, np.zeros(12, np.int32),
                                      np.zeros(12, np.int32), np.zeros(12, np.float32), np.zeros(12, np.int32),
                                      float(index % 2), "stop") for index in range(8)]
                outcome = queue.put(group.group_id, encode_group(answers))
                controller.delivered(group.group_id, dropped=outcome != "queued")
            return time.perf_counter() - started

        delivered, taken = [], []
        for step in range(repeats):
            delivered.append(ray.get(deliver.remote(controller, queue)))
            started = time.perf_counter()
            _, stale = queue.take(groups, training_step=step)
            controller.free_slots(stale)
            taken.append(time.perf_counter() - started)
    ray.shutdown()
    return {"host_s": min(delivered) / groups, "take_s": min(taken) / groups}


def _trajectories(run_dir: Path) -> list[dict]:
    return [t for shard in sorted((run_dir / "trajectories").glob("shard-*")) for t in read_trajectory_log(shard)]


def run_rates(run_dir: Path, head_start_s: float) -> dict:
    """The component rates of one run (see the module's docstring)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    if len(lines) < 3:
        raise SystemExit(f"{run_dir}/metrics.jsonl has {len(lines)} steps; the rates need 3 at least")
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    groups_per_step, group_size = saved["rollout"]["groups_per_step"], saved["generation"]["group_size"]
    steady = lines[1:]
    generated_tokens = sum(line["tokens_per_s"] * line["step_s"] for line in steady)
    groups_generated = sum(groups_per_step + line["groups_dropped"] for line in steady)
    trajectories = _trajectories(run_dir)
    logs = np.log([len(t["output_tokens"]) for t in trajectories])
    return {
        "run": str(run_dir),
        "max_staleness": saved["rollout"]["max_staleness"],
        "steps": len(lines),
        "head_start_s": head_start_s,
        "gather_s": statistics.fmean(line["gather_s"] for line in steady),
        "train_tokens_per_s": sum(line["trained_tokens"] for line in steady) / sum(line["train_s"] for line in steady),
        "weight_sync_s": statistics.fmean(line["weight_sync_seconds"] for line in steady),
        "generation_tokens_per_s": generated_tokens / sum(line["generation_s"] for line in steady),
        "reward_s": sum(line["reward_s"] for line in steady) / (groups_generated * group_size),
        "filtered_fraction": sum(line["groups_dropped"] for line in steady) / groups_generated,
        "prompt_tokens": round(statistics.fmean(len(t["prompt_tokens"]) for t in trajectories)),
        # the log-normal fitted to the responses: its mean (before clipping) and the spread of the logs
        "length_mean": math.exp(float(logs.mean()) + float(logs.std()) ** 2 / 2),
        "length_sigma": float(logs.std()),
    }


def simulated(inputs: dict, max_staleness: int | None, steps: int, workers: int, extra: list[str],
              seed: int) -> list[StepRecord]:
    """The simulator's steps of a bench_staleness run with `inputs`."""
    config = run_config(max_staleness, steps, workers, extra)
    shape, _ = model_shape(config.model, BUNDLED_WARMSTART)
    lengths = LengthModel(mean=inputs["length_mean"], cap=config.generation.max_new_tokens,
                          sigma=inputs["length_sigma"])
    model = config_system(
        config, shape, decode_cost_from_rate(inputs["generation_tokens_per_s"]), inputs["train_tokens_per_s"],
        prompt_tokens=inputs["prompt_tokens"], lengths=lengths, weight_sync_s=inputs["weight_sync_s"],
        reward_s=inputs["reward_s"], host_s=inputs["host_s"], host_polled_s=inputs["host_polled_s"],
        take_s=inputs["take_s"], filtered_fraction=inputs["filtered_fraction"], learner_start_s=inputs["head_start_s"])
    return simulate(model, steps, seed)


def host_overheads(synchronous: dict, workers: int, extra: list[str], seed: int) -> dict:
    """host_s and take_s measured here, host_polled_s fitted to a synchronous run (see the module's docstring)."""
    if synchronous["max_staleness"] != 0:
        raise SystemExit(f"{synchronous['run']} ran with max_staleness={synchronous['max_staleness']}: the host "
                         "overheads come from a synchronous run (0)")
    overheads = host_seconds()
    low, high = 0.0, 1.0
    for _ in range(FIT_ITERATIONS):
        middle = (low + high) / 2
        records = simulated({**synchronous, **overheads, "host_polled_s": middle}, 0, synchronous["steps"], workers,
                            extra, seed)
        if statistics.fmean(r.gather_s for r in records[1:]) < synchronous["gather_s"]:
            low = middle
        else:
            high = middle
    return {**overheads, "host_polled_s": (low + high) / 2}


def predicted(records: list[StepRecord]) -> dict:
    loop_s = sum(r.step_s for r in records)
    return {"train_loop_seconds": loop_s, "trajectories_per_s": sum(r.trajectories for r in records) / loop_s,
            "gather_s": statistics.fmean(r.gather_s for r in records),
            "train_s": statistics.fmean(r.train_s for r in records),
            "staleness_max": max(max(r.staleness) for r in records)}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--measured", type=Path, default=Path("results/bench_staleness.json"),
                        help="bench_staleness.py report to compare with (default: %(default)s)")
    parser.add_argument("--calibration-run", type=Path, default=None,
                        help="a synchronous run folder for the host overheads instead of the report's")
    parser.add_argument("--head-start-s", type=float, default=0.0,
                        help="with --calibration-run: the workers' head start before its first step (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/validate_simulate.json"))
    parser.add_argument("overrides", nargs="*",
                        help="config overrides of the measured runs (as given to bench_staleness)")
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    if any("run_dir" not in result for result in measured["results"]):
        raise SystemExit(f"{args.measured} names no run folders (results[].run_dir, head_start_s): measure again with "
                         "this checkout's bench_staleness.py")
    workers = measured["workers"]
    runs = {result["max_staleness"]: run_rates(Path(result["run_dir"]), result["head_start_s"])
            for result in measured["results"]}
    synchronous = run_rates(args.calibration_run, args.head_start_s) if args.calibration_run else runs.get(0)
    if synchronous is None:
        raise SystemExit(f"{args.measured} has no max_staleness 0 run: pass --calibration-run")
    overheads = host_overheads(synchronous, workers, args.overrides, args.seed)
    print("host overheads: " + ", ".join(f"{key} {value:.4g}" for key, value in overheads.items()))
    rows = []
    for result in measured["results"]:
        eta, steps = result["max_staleness"], result["steps"]
        own = predicted(simulated({**runs[eta], **overheads}, eta, steps, workers, args.overrides, args.seed))
        borrowed = predicted(simulated({**synchronous, **overheads, "head_start_s": runs[eta]["head_start_s"]}, eta,
                                       steps, workers, args.overrides, args.seed))
        error = own["trajectories_per_s"] / result["trajectories_per_s"] - 1
        rows.append({"max_staleness": eta, "steps": steps, "rates": runs[eta],
                     "measured": {key: result[key] for key in ("trajectories_per_s", "train_loop_seconds")},
                     "predicted": own, "error": error, "within_bar": abs(error) <= BAR,
                     "predicted_with_synchronous_rates": borrowed,
                     "error_with_synchronous_rates": borrowed["trajectories_per_s"] / result["trajectories_per_s"] - 1})
    print_columns([("max_staleness", 13), ("measured traj/s", 15), ("predicted", 9), ("error", 7),
                   ("measured step s", 15), ("predicted", 9), ("sync rates: traj/s", 18), ("error", 7)],
                  [[str(row["max_staleness"]), f"{row['measured']['trajectories_per_s']:.1f}",
                    f"{row['predicted']['trajectories_per_s']:.1f}", f"{row['error']:+.1%}",
                    f"{row['measured']['train_loop_seconds'] / row['steps']:.3f}",
                    f"{row['predicted']['train_loop_seconds'] / row['steps']:.3f}",
                    f"{row['predicted_with_synchronous_rates']['trajectories_per_s']:.1f}",
                    f"{row['error_with_synchronous_rates']:+.1%}"] for row in rows])
    print("the synchronous run's gather_s is matched by construction (host_polled_s is fitted to it)")
    report = {"measured_file": str(args.measured), "load_average_1_5_15_min": os.getloadavg(), "cpus": os.cpu_count(),
              "host_overheads": overheads, "overheads_from": synchronous["run"], "overrides": args.overrides,
              "bar": BAR, "rows": rows}
    write_report(report, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
