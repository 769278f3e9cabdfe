"""The whole RL step on one device, through `areal-async train`, against the engine and the learner alone.

Shape: DeepSeek-R1-Distill-Qwen-1.5B (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960) with the
real 151,936-token vocabulary: random weights (the model's own initialisation, seed 0) saved as a checkpoint
folder with the project's byte tokenizer padded to that vocabulary (`build_byte_tokenizer(vocab_size=...)`).
Prompts are random letters (one token each). Random weights never answer correctly, so every group has zero
reward variance: the runs set ppo.filter_zero_variance_groups=false to train on them anyway.

Workloads:
  i   -- 32 prompts x 8 samples x 1,024 new tokens, prompts of 128 tokens;
  ii  -- the seed's first stage at AReaL's small-scale batch: 64 prompts x 16 samples, prompts of 256 tokens,
         per-request limits drawn log-normal with mean 2,048, capped at 8,192 (generation.simulated_length_mean:
         random weights do not stop by themselves).

Per workload, in one process (`--parts run alone`, the default; either part alone where one process may not
take both):
  1. the run: `areal-async train` (the same composition: `compose_config("train", overrides)` then
     `run_training`) with inline placement on the device, `--steps` steps; the first `--warmup-steps` steps
     compile and capture CUDA graphs and are not timed. Per timed step: generation, reward, proximal recompute,
     update, weight publication and the rest (packing, queue, admission), and trained tokens/s (prompt +
     output tokens trained per second of step) per GPU;
  2. the engine alone: the run's engine generates the same number of requests with the same prompt and token-
     limit distribution (warm: the run captured its graphs, or without the run `warm_engine` does);
  3. the learner alone: the run's learner takes two PPO steps (proximal recompute + update) on trajectories of
     those generations; the second is timed (the first compiles for the new packs' lengths).
The overhead is the ratio: mean run step time / (engine alone + learner alone). The run's summary gives the
ledger, the worker-vs-learner checksum check, the generation errors, the verifier's errors and its "unparsed"
verdicts (answers it could not read: most of random weights' answers). On one GPU the phases take turns with
the memory (areal_async/planning/memory_plan.py): `memory` gives each phase's planned peak of allocated memory against
the largest measured (metrics.jsonl's peak_gib_<phase>, and the engine and learner alone).

Prints a table and writes JSON (default `results/bench_end_to_end.json`, run from the repository root). `--tiny`
runs a tiny shape on the CPU (a smoke test of the script, not a measurement).

    PYTHONPATH=$PWD python3 benchmarks/bench_end_to_end.py --workloads i ii
    PYTHONPATH=$PWD python3 benchmarks/bench_end_to_end.py --tiny
    PYTHONPATH=$PWD python3 benchmarks/bench_end_to_end.py --workloads ii --parts run    # the run alone
"""

from __future__ import annotations

import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actors.sampling import long_tailed_limit
from areal_async.types import SamplingParams, Trajectory
from areal_async.run.cli import compose_config
from areal_async.objective import trajectory_advantages
from areal_async.model.shapes import R1_DISTILL_QWEN_1_5B, TINY_BENCHMARK
from areal_async.run.trainer import Trainer
from harness import (default_dtype, empty_cache, gpu_facts, keep_going, log, make_checkpoint, pick_device,
                     print_markdown_table, random_letters, script_parser, synchronize, timed, write_prompts,
                     write_report)

SHAPE, TINY_SHAPE = R1_DISTILL_QWEN_1_5B, TINY_BENCHMARK
# prompts, samples per prompt, prompt tokens, max new tokens, simulated length mean (None: every request runs to
# the limit)
WORKLOADS = {
    "i": dict(prompts=32, group_size=8, prompt_tokens=128, max_new_tokens=1024, length_mean=None),
    "ii": dict(prompts=64, group_size=16, prompt_tokens=256, max_new_tokens=8192, length_mean=2048),
}
TINY_WORKLOADS = {
    "i": dict(prompts=4, group_size=4, prompt_tokens=16, max_new_tokens=32, length_mean=None),
    "ii": dict(prompts=4, group_size=4, prompt_tokens=24, max_new_tokens=64, length_mean=24),
}
PHASES = ("generation_s", "reward_s", "prepare_s", "update_s", "weight_sync_seconds", "other_s")


def run_overrides(workload: dict, checkpoint: Path, prompts: Path, out_dir: Path, name: str, steps: int,
                  device: torch.device, dtype: str) -> list[str]:
    """The `areal-async train` overrides of the workload's run."""
    overrides = [
        f"device={device.type}", f"model.path={checkpoint}", f"model.dtype={dtype}",
        "data.kind=jsonl", f"data.path={prompts}", "data.num_heldout=0", "eval.num_samples=0",
        f"total_steps={steps}", "checkpoint_every=0", f"output_dir={out_dir}", f"run_name={name}",
        f"rollout.groups_per_step={workload['prompts']}", f"rollout.groups_per_request={workload['prompts']}",
        f"rollout.queue_capacity_per_shard={2 * workload['prompts']}",
        f"generation.group_size={workload['group_size']}", f"generation.max_new_tokens={workload['max_new_tokens']}",
        "ppo.filter_zero_variance_groups=false", "ppo.lr=1e-6",
    ]
    if workload["length_mean"] is not None:
        overrides.append(f"generation.simulated_length_mean={workload['length_mean']}")
    return overrides


def engine_alone(trainer: Trainer, workload: dict, seed: int) -> tuple[dict, list[Trajectory]]:
    """The run's engine on the workload's shapes (new prompts, limits from the same distribution)."""
    engine, tokenizer, config = trainer.worker.engine, trainer.tokenizer, trainer.config
    rng = random.Random(seed)
    prompts = [tokenizer.encode(random_letters(rng, workload["prompt_tokens"])) for _ in range(workload["prompts"])]
    requests = [(p, s) for p in range(len(prompts)) for s in range(workload["group_size"])]
    limit = workload["max_new_tokens"]
    limits = [limit if workload["length_mean"] is None else
              long_tailed_limit(workload["length_mean"], min(16, limit), limit, f"alone{seed}:{p}:{s}")
              for p, s in requests]
    params = SamplingParams(max_new_tokens=limit, temperature=config.generation.temperature,
                            stop_token_ids=(tokenizer.eos_token_id,), seed=seed)
    generations, seconds = timed(lambda: engine.generate([prompts[p] for p, _ in requests], params,
                                                         max_new_tokens=limits), engine.device)
    tokens = sum(len(g.tokens) for g in generations)
    rewards = np.random.default_rng(seed).choice([5.0, -5.0], size=len(requests))
    trajectories = [
        Trajectory(f"q{p}", f"alone{p}", s, np.asarray(prompts[p], dtype=np.int32),
                   np.asarray(g.tokens, dtype=np.int32), np.asarray(g.logprobs, dtype=np.float32),
                   np.asarray(g.versions, dtype=np.int32), float(reward), g.finish_reason)
        for (p, s), g, reward in zip(requests, generations, rewards)
    ]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "graph_captures": engine.stats.get("graph_captures", 0)}, trajectories


def learner_alone(trainer: Trainer, trajectories: list[Trajectory]) -> dict:
    """The second of two PPO steps on `trajectories`: the first compiles for their packs' lengths, which the run's
    packs did not have (measured cold on an H100, the one step took 2.4 x the run's warm training phases)."""
    learner = trainer.learner
    advantages = trajectory_advantages(trajectories, trainer.config.ppo.advantage_norm.value)
    learner.train_step(trajectories, advantages)
    synchronize(learner.ppo.device)
    started = time.perf_counter()
    stats = learner.train_step(trajectories, advantages)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "trained_tokens": stats["trained_tokens"],
            "trained_tokens_per_s": stats["trained_tokens"] / seconds, **learner.last_step_timings}


def bench_workload(name: str, workload: dict, args, device: torch.device, checkpoint: Path, work: Path) -> dict:
    prompts = write_prompts(work / f"prompts_{name}.jsonl", 4 * workload["prompts"] * args.steps,
                            workload["prompt_tokens"], seed=1)
    overrides = run_overrides(workload, checkpoint, prompts, work / "runs", f"e2e_{name}", args.steps, device,
                              args.dtype) + list(args.overrides)
    log(f"[{name}] areal-async train " + " ".join(overrides))
    started = time.perf_counter()
    trainer = Trainer(compose_config("train", overrides))
    result: dict = {"overrides": overrides, "build_s": time.perf_counter() - started, "parts": args.parts}
    records: list[dict] = []
    if "run" in args.parts:
        built = time.perf_counter()
        summary = trainer.run(show_progress=False)
        result["run_s"] = time.perf_counter() - built
        records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = records[args.warmup_steps:] or records[-1:]
        step_s = float(np.mean([r["step_s"] for r in timed]))
        trained_tokens = float(np.mean([r["trained_tokens"] for r in timed]))
        result.update({
            "steps": [{k: r.get(k) for k in ("step", "step_s", "trained_tokens", "response_length_mean", *PHASES)}
                      for r in records],
            "timed_steps": len(timed),
            "step_s": step_s,
            "phases_s": {phase: float(np.mean([r.get(phase, 0.0) for r in timed])) for phase in PHASES},
            "generated_tokens_per_step": float(np.mean([r["tokens_per_s"] * r["step_s"] for r in timed])),
            "trained_tokens_per_step": trained_tokens,
            "trained_tokens_per_s_per_gpu": trained_tokens / step_s,  # one GPU
            "summary": {k: summary.get(k) for k in ("ledger_balanced", "produced", "consumed", "dropped", "queued",
                                                    "in_flight", "rollout_weights_identical", "generation_errors",
                                                    "reward_failures", "version")},
        })
    alone_peaks: dict[str, float] = {}
    if "alone" in args.parts:
        if "run" not in args.parts:  # the run's first step would have compiled and captured the decode step
            warm_engine(trainer, workload)
        alone_generation, trajectories = engine_alone(trainer, workload, seed=7)
        alone_peaks = trainer.enter_memory_phase("training")  # the KV pool makes room for the learner, as in the run
        alone_training = learner_alone(trainer, trajectories)
        alone_peaks |= trainer.enter_memory_phase("generation")
        result.update(engine_alone=alone_generation, learner_alone=alone_training)
    if "run" in args.parts and "alone" in args.parts:
        # the engine alone generated a workload of the same distribution, not the same tokens: scale its time to
        # the run's token count, and the learner's to the run's trained tokens
        result["engine_alone_s_scaled"] = (alone_generation["seconds"] * result["generated_tokens_per_step"]
                                           / max(1, alone_generation["tokens"]))
        result["learner_alone_s_scaled"] = (alone_training["seconds"] * result["trained_tokens_per_step"]
                                            / max(1.0, alone_training["trained_tokens"]))
        result["overhead_ratio"] = result["step_s"] / (result["engine_alone_s_scaled"] + result["learner_alone_s_scaled"])
        result["overhead_ratio_unscaled"] = result["step_s"] / (alone_generation["seconds"] + alone_training["seconds"])
    result["memory"] = memory_report(trainer.memory_plan, records, alone_peaks)
    del trainer
    gc.collect()
    empty_cache(device)
    return result


def warm_engine(trainer: Trainer, workload: dict) -> None:
    """What a run's first step does to the engine, so that the engine alone is timed warm: the decode step captured
    at every batch size for the workload's longest request, and prefills of two shapes (compiled, then recompiled
    with dynamic shapes)."""
    engine, config = trainer.worker.engine, trainer.config
    stop = (trainer.tokenizer.eos_token_id,)
    longest = workload["prompt_tokens"] + 1 + workload["max_new_tokens"]  # one token of slack for a BOS
    params = SamplingParams(max_new_tokens=workload["max_new_tokens"], temperature=config.generation.temperature,
                            stop_token_ids=stop)
    # the buffers for the whole workload first: the smaller calls below then never regrow them (on an H100 a
    # regrowth after an 8-slot call found the old 44.6 GiB pool still allocated and ran out of memory)
    engine.reserve(longest, workload["max_new_tokens"], params)
    for count, length in ((8, workload["prompt_tokens"]), (24, workload["prompt_tokens"] // 2)):
        engine.generate([[5 + i] * length for i in range(count)],
                        SamplingParams(max_new_tokens=8, temperature=config.generation.temperature, stop_token_ids=stop))


def memory_report(plan, records: list[dict], alone_peaks: dict[str, float]) -> dict | None:
    """One GPU: each phase's planned peak of allocated memory (the reserve left out: torch does not allocate it)
    against the largest measured in any step of the run and in the engine and learner alone, and the ratio of the
    two peaks over all phases (the plan must not be below the measured, and at most 10% above it)."""
    if plan is None:
        return None
    planned = {phase: (value - plan.reserve) / 2**30 for phase, value in plan.phases.items()}
    measured = {phase: max([r[f"peak_gib_{phase}"] for r in records if f"peak_gib_{phase}" in r]
                           + [alone_peaks.get(f"peak_gib_{phase}", 0.0)]) for phase in planned}
    return {"plan_gib": planned, "measured_gib": measured, "plan_peak_gib": max(planned.values()),
            "measured_peak_gib": max(measured.values()),
            "plan_over_measured": max(planned.values()) / max(measured.values()),
            "micro_batch_tokens": plan.micro_batch_tokens, "kv_pool_gib": plan.kv_cache / 2**30,
            "planned_sequences": plan.sequences}


def print_table(results: dict) -> None:
    rows = []
    for name, r in results.items():
        p, s = r["phases_s"], r["summary"]
        rows.append([name, *(f"{v:.2f}" for v in (r["step_s"], *(p[phase] for phase in PHASES),
                                                   r["engine_alone_s_scaled"], r["learner_alone_s_scaled"])),
                     f"{r['overhead_ratio']:.3f}", f"{r['trained_tokens_per_s_per_gpu']:,.0f}", s["ledger_balanced"],
                     s["rollout_weights_identical"], s["generation_errors"], verifier_errors(s["reward_failures"]),
                     (s["reward_failures"] or {}).get("unparsed", 0)])
    print_markdown_table(["workload", "step s", "gen", "reward", "recompute", "update", "publish", "rest",
                          "engine alone", "learner alone", "overhead", "trained tok/s/GPU", "ledger", "checksums",
                          "gen err", "verifier err", "unparsed"], rows)


def verifier_errors(failures: dict | None) -> int:
    """Scoring tasks the verifier could not run (timeouts, memory, dead workers, exceptions); "unparsed" answers
    (text the parser cannot read, the common case for random weights) are verdicts, counted apart."""
    return sum(n for reason, n in (failures or {}).items() if reason != "unparsed")


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--workloads", nargs="+", default=["i", "ii"], choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=3, help="RL steps per run (the first --warmup-steps untimed)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--parts", nargs="+", default=["run", "alone"], choices=["run", "alone"],
                        help="the run, the engine and learner alone, or both (default; the overhead needs both)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and workload on the CPU (smoke test)")
    parser.add_argument("--work-dir", default=None, help="checkpoint and run folders (default: a temporary folder)")
    parser.add_argument("--out", default="results/bench_end_to_end.json", help="JSON file; default: %(default)s")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="train overrides applied after the workload's own (e.g. engine.max_slots=512)")
    args = parser.parse_args()
    device = pick_device(tiny=args.tiny)
    args.dtype = args.dtype or default_dtype(device)
    shape, workloads = (TINY_SHAPE, TINY_WORKLOADS) if args.tiny else (SHAPE, WORKLOADS)
    report = {"args": vars(args), "device": str(device), "torch": torch.__version__, "results": {}, "errors": {}}
    # gpu_total_bytes: the memory the inline run's plan divides (its KV budget: validate_simulate_gpu.py models it)
    report |= gpu_facts(device)
    log(f"device {report.get('device_name', device)}, torch {torch.__version__}, dtype {args.dtype}")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work_dir or temporary)
        started = time.perf_counter()
        checkpoint = make_checkpoint(work, shape, getattr(torch, args.dtype))
        report["checkpoint_s"] = time.perf_counter() - started
        for name in args.workloads:
            with keep_going(report["errors"], name):  # one failing workload must not lose the other
                result = report["results"][name] = bench_workload(
                    name, workloads[name], args, device, checkpoint, work)
                if "overhead_ratio" in result:
                    log(f"[{name}] {json.dumps(result['phases_s'])} overhead {result['overhead_ratio']:.3f}")
                if result["memory"]:
                    log(f"[{name}] memory GiB, plan / measured: {json.dumps(result['memory'])}")
            write_report(report, args.out)  # after every workload: a run cut short keeps what it measured
    complete = {name: r for name, r in report["results"].items() if "overhead_ratio" in r}
    if complete:
        print_table(complete)
    log(f"written to {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
