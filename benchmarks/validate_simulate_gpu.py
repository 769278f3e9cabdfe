"""Checks `areal-async simulate` against the one-GPU end-to-end run of benchmarks/bench_end_to_end.py.

That run is `areal-async train` with inline placement at max_staleness 0: each step the engine generates the
step's groups in one call, the worker scores them, the learner trains (proximal recompute, update) and publishes
its weights to the engine, which holds no sequence by then (no KV cache to recompute). The simulator runs the
run's config as one rollout worker and one learner rank (simulate_inputs.config_system's inline model): at
max_staleness 0 they take turns, the same timeline apart from the host work between the phases.

Predicted from the component benchmarks, not from the run:
- generation: a decode step's and a prefill token's cost, fitted from a bench_generation.py report
  (`--generation-system`, default ours_compiled: the engine of an inline CUDA run, compiled decode with SDPA);
- training: trained tokens/s of a bench_training.py row (default ours a ppo_step), scaled by the config's
  forward passes;
- the engine's slots: the KV budget the trainer plans on the GPU's memory (the report's gpu_total_bytes, else
  `--gpu-memory-gib`).
Taken from the run itself (inputs, not predictions; both small): the scoring seconds per response (the timed
steps' reward_s over their responses) and the publication round (weight_sync_seconds).
Lengths: a workload without generation.simulated_length_mean runs every request to max_new_tokens (random
weights hardly ever sample the stop token); one with it draws each limit log-normal (sigma 1) with that mean,
clipped to [min(16, max_new_tokens), max_new_tokens], as the rollout worker does. The simulator still ends such a
call at a host look, not at the last limit (a few decode steps). Prompt lengths and the shape are the benchmark's
(bench_end_to_end.WORKLOADS and SHAPE, or their TINY_ forms for a --tiny report).
Not modelled: the rest of the step (other_s: packing, advantages, queue and controller calls, the frames), which
counts against the prediction; the table shows it.

The simulator runs the run's steps; means are over the timed steps (the last `timed_steps`). Compared: seconds
per step (within BAR, 15%), of generation, and of training (proximal recompute + update).

    PYTHONPATH=$PWD python benchmarks/validate_simulate_gpu.py --end-to-end results/bench_end_to_end.json \\
        --generation results/bench_generation.json --training results/bench_training.json --workloads i ii

Prints a table and writes JSON (default `results/validate_simulate_e2e.json`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from areal_async.planning.memory_plan import GIB
from areal_async.model.decoder import DecoderConfig
from areal_async.run.cli import compose_config
from areal_async.run.simulation import generation_from_report, training_from_report
from areal_async.planning.simulate import DecodeCost, LengthModel, StepRecord, simulate, summarize
from areal_async.planning.simulate_inputs import report_value, config_system, load_report
from bench_end_to_end import PHASES, SHAPE, TINY_SHAPE, TINY_WORKLOADS, WORKLOADS  # benchmarks/: first on sys.path
from harness import script_parser, write_report
from validate_simulate import BAR

TRAINING_ROW = ["ours", "a", "ppo_step"]


def run_shape(e2e: dict, path: Path) -> tuple[DecoderConfig, dict]:
    """The model shape and the workload table (prompt tokens) the end-to-end report was measured with."""
    tiny = bool(report_value(e2e, path, "args", "tiny"))
    return DecoderConfig(**(TINY_SHAPE if tiny else SHAPE)), TINY_WORKLOADS if tiny else WORKLOADS


def gpu_memory_gib(e2e: dict, path: Path, given: float | None) -> float:
    """GiB of the GPU the run planned its KV budget on: `given`, else the report's gpu_total_bytes."""
    if given is not None:
        return given
    if "gpu_total_bytes" not in e2e:
        raise ValueError(f"{path}: no key gpu_total_bytes (an older bench_end_to_end.py wrote it without): pass "
                         "--gpu-memory-gib (an 80 GB H100 reports 79.2)")
    return e2e["gpu_total_bytes"] / GIB


def run_config(e2e: dict, path: Path, name: str, memory_gib: float | None):
    """The run's TrainConfig: its overrides (model.path need not exist here), on a GPU of `memory_gib`."""
    config = compose_config("train", list(report_value(e2e, path, "results", name, "overrides")))
    if torch.device(config.device).type == "cuda":  # config_system plans the KV budget on cluster.gpu_memory_gib
        config.cluster.gpu_memory_gib = gpu_memory_gib(e2e, path, memory_gib)
    if config.rollout.max_staleness != 0:
        raise ValueError(f"{path}: workload {name} ran with max_staleness={config.rollout.max_staleness}; the inline "
                         "model holds at 0 only")
    return config


def run_lengths(config) -> LengthModel:
    """Response lengths in tokens: every request to its limit, or the worker's simulated long-tailed limits."""
    generation = config.generation
    cap = generation.max_new_tokens
    if generation.simulated_length_mean is None:
        return LengthModel(mean=cap, cap=cap, sigma=0.0)
    return LengthModel(mean=generation.simulated_length_mean, cap=cap, sigma=1.0, low=min(16, cap))


def measured(e2e: dict, path: Path, name: str) -> dict:
    """The run's means over its timed steps, seconds (trained tokens per step)."""
    phases = {phase: float(report_value(e2e, path, "results", name, "phases_s", phase)) for phase in PHASES}
    return {"steps": len(report_value(e2e, path, "results", name, "steps")),
            "timed_steps": int(report_value(e2e, path, "results", name, "timed_steps")),
            "step_s": float(report_value(e2e, path, "results", name, "step_s")),
            "generation_s": phases["generation_s"], "training_s": phases["prepare_s"] + phases["update_s"],
            "reward_s": phases["reward_s"], "weight_sync_s": phases["weight_sync_seconds"],
            "other_s": phases["other_s"],
            "trained_tokens_per_step": float(report_value(e2e, path, "results", name, "trained_tokens_per_step"))}


def predicted(records: list[StepRecord], timed: int) -> dict:
    """Means over the last `timed` simulated steps, seconds: the step, its decoding (the one worker's decode
    share of it), training, scoring (host) and the publication round."""
    summary = summarize(records, len(records) - timed)
    return {"step_s": summary.step_s, "generation_s": summary.generation["decode"] * summary.step_s,
            "training_s": summary.train_s, "host_s": summary.generation["host"] * summary.step_s,
            "sync_s": summary.sync_s,
            "trained_tokens_per_step": statistics.fmean(r.trained_tokens for r in records[-timed:])}


def validate_workload(e2e: dict, path: Path, name: str, args, decode) -> dict:
    """One workload's row: its inputs, the run's means, the simulator's and their errors."""
    shape, workloads = run_shape(e2e, path)
    config = run_config(e2e, path, name, args.gpu_memory_gib)
    prompt_tokens = workloads[name]["prompt_tokens"]
    if workloads[name]["max_new_tokens"] != config.generation.max_new_tokens:
        raise ValueError(f"{path}: workload {name} ran with generation.max_new_tokens="
                         f"{config.generation.max_new_tokens}, bench_end_to_end.py's now has "
                         f"{workloads[name]['max_new_tokens']}: its prompt lengths may have changed too")
    run = measured(e2e, path, name)
    responses = config.rollout.groups_per_step * config.generation.group_size
    training = training_from_report(args.training, args.training_row, config, shape)
    model = config_system(config, shape, decode, training["tokens_per_s"], prompt_tokens=prompt_tokens,
                          lengths=run_lengths(config), weight_sync_s=run["weight_sync_s"],
                          reward_s=run["reward_s"] / responses)
    ours = predicted(simulate(model, run["steps"], args.seed), run["timed_steps"])
    errors = {key: ours[key] / run[key] - 1 for key in ("step_s", "generation_s", "training_s")}
    return {"workload": name, "slots": model.engine.slots, "prompt_tokens": prompt_tokens,
            "lengths": asdict(model.lengths), "training": training,
            "inputs_from_run": {"reward_s_per_response": model.reward_s, "weight_sync_s": model.weight_sync_s},
            "measured": run, "predicted": ours, "error": errors,
            "within_bar": {key: abs(error) <= BAR for key, error in errors.items()},
            "alone_s_scaled": {key: e2e["results"][name].get(f"{key}_alone_s_scaled") for key in ("engine", "learner")}}


def print_table(rows: list[dict]) -> None:
    """Measured against modelled, per workload: step, generation and training seconds, trained tokens per step."""
    print(f"\n{'workload':>8} {'slots':>5} | {'step s':>7} {'model':>7} {'error':>7} | {'gen s':>7} {'model':>7} "
          f"{'error':>7} | {'train s':>7} {'model':>7} {'error':>7} | {'other s':>7} | {'trained tok':>11} "
          f"{'model':>11}")
    for row in rows:
        run, ours, error = row["measured"], row["predicted"], row["error"]
        print(f"{row['workload']:>8} {row['slots']:>5} | {run['step_s']:7.2f} {ours['step_s']:7.2f} "
              f"{error['step_s']:+7.1%} | {run['generation_s']:7.2f} {ours['generation_s']:7.2f} "
              f"{error['generation_s']:+7.1%} | {run['training_s']:7.2f} {ours['training_s']:7.2f} "
              f"{error['training_s']:+7.1%} | {run['other_s']:7.2f} | {run['trained_tokens_per_step']:11,.0f} "
              f"{ours['trained_tokens_per_step']:11,.0f}")
    print(f"bar: |error| <= {BAR:.0%}; scoring and the publication round are the run's own (inputs); other s (host "
          "work between the phases) is not modelled")


def validate(args) -> dict:
    """The report: the decode fit (once), then a row per workload."""
    e2e = load_report(args.end_to_end)
    names = args.workloads or list(report_value(e2e, args.end_to_end, "results"))
    decode, generation = generation_from_report(args.generation, args.generation_system,
                                                run_shape(e2e, args.end_to_end)[0])
    rows = [validate_workload(e2e, args.end_to_end, name, args, decode) for name in names]
    return {"end_to_end_file": str(args.end_to_end), "device_name": e2e.get("device_name"), "bar": BAR,
            "generation": {**generation, "cost": asdict(decode)}, "seed": args.seed, "rows": rows}


def parser() -> argparse.ArgumentParser:
    options = script_parser(__doc__)
    options.add_argument("--end-to-end", type=Path, required=True, help="bench_end_to_end.py report (the run)")
    options.add_argument("--generation", type=Path, required=True, help="bench_generation.py report")
    options.add_argument("--training", type=Path, required=True, help="bench_training.py report")
    options.add_argument("--workloads", nargs="+", default=None, help="default: every workload of the run")
    options.add_argument("--generation-system", default="ours_compiled", help="default: %(default)s")
    options.add_argument("--training-row", nargs=3, default=TRAINING_ROW, metavar=("SYSTEM", "WORKLOAD", "STEP_KIND"),
                         help="default: %(default)s")
    options.add_argument("--gpu-memory-gib", type=float, default=None,
                         help="the run's GPU memory, for a report without gpu_total_bytes")
    options.add_argument("--seed", type=int, default=0, help="seed of the simulated lengths")
    options.add_argument("--out", type=Path, default=Path("results/validate_simulate_e2e.json"))
    return options


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = validate(args)
    except ValueError as error:
        print(f"validate_simulate_gpu: {error}", file=sys.stderr)
        return 2
    print(f"{DecodeCost(**report['generation']['cost']).describe()} ({report['generation']['file']}, "
          f"{report['generation']['system']})")
    for row in report["rows"]:
        print(f"{row['workload']}: {row['training']['tokens_per_s']:,.0f} trained tokens/s "
              f"({row['training']['file']}); from the run: scoring "
              f"{row['inputs_from_run']['reward_s_per_response'] * 1e3:.3f} ms per response, publication "
              f"{row['inputs_from_run']['weight_sync_s']:.3f} s")
    print_table(report["rows"])
    write_report(report, args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
