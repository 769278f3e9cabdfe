"""`areal-async simulate`: a config run through the discrete-event model (areal_async/planning/simulate.py) with rates
from the benchmarks' reports (areal_async/planning/simulate_inputs.py); prints the inputs and a table, writes JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from areal_async.run.cli import compose_config, config_error_line
from areal_async.planning.simulate import DecodeCost, LengthModel, hours_for, simulate, summarize
from areal_async.actor_system.staleness import parse_staleness

BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GENERATION_REPORT = BENCHMARK_RESULTS / "bench_generation_h100_2026-12-06_split.json"
TRAINING_REPORT = BENCHMARK_RESULTS / "bench_training_h100_2026-11-25_v6.json"
VERIFIER_REPORT = BENCHMARK_RESULTS / "bench_verifier_cpu2_2026-12-06.json"


SIMULATE_EPILOG = """
Where the rates come from (each can be given instead, which skips its report):
  generation    --generation-json (bench_generation): a decode step's cost, fixed + per slot + per cache
                position read, fitted from results.step_ms_<system>, <system>_fixed and <system>_longtail
                (--batch-share skips the longtail fit); or --gen-tokens-per-s, one rate per engine whatever
                its batch
  training      --training-json (bench_training): tokens/s of one results row (--training-row), scaled by the
                config's forward passes (activation checkpointing, KL reference); or --train-tokens-per-s
  publication   --weight-sync-json (bench_weight_sync): GB/s of a --weight-sync-transport row applied to the
                model's bytes; else --weight-sync-gb-per-s (an assumption: no NCCL figure has been measured)
  scoring       --verifier-json (bench_verifier): seconds per response of one verifier process; or --reward-s
Response lengths are log-normal (--length-sigma) with mean --length-mean before clipping to
generation.max_new_tokens, as the benchmarks' long-tailed workloads; prompts are --prompt-tokens long.

The table gives, per cluster and max_staleness, the steady step (means after --warmup steps): its seconds and
phases (gather: waiting for groups; train; sync: the publish round), the share of the rollout GPUs' time spent
decoding (busy) and not (idle: weight sync, scoring and delivery on the host, nothing admitted), the learner
GPUs' idle share, trajectories/s and trained tokens/s, the hours for --epochs over --dataset-prompts prompts, and
the speed-up over max_staleness 0 on the same cluster. The JSON (--out) also holds every step.

examples:
  areal-async simulate --config recipe_1.5B --clusters n1 n4 n16       # max_staleness 0 and the recipe's 4
  areal-async simulate --config recipe_1.5B cluster=n16 --staleness 0 1 2 4 8 --length-mean 6000
  areal-async simulate --config recipe_1.5B cluster=n4 --gen-tokens-per-s 20000 --train-tokens-per-s 30000
"""


def simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="areal-async simulate", epilog=SIMULATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A discrete-event model of a Ray run of the config (areal_async/planning/simulate.py): rollout workers "
                    "decoding admitted groups with continuous batching, the staleness rule, the replay queue, "
                    "learner ranks training and publishing every version. Predicts wall time per step, idle GPU "
                    "time, trained tokens/s and trajectories/s, synchronous against asynchronous.")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value, as for train")
    parser.add_argument("--config", default="recipe_1.5B", help="config file in configs/ (default: recipe_1.5B)")
    parser.add_argument("--clusters", nargs="+", metavar="NAME",
                        help="cluster configs to compare (configs/cluster/NAME.yaml, e.g. n1 n4 n16); default: "
                             "the config's own")
    parser.add_argument("--staleness", nargs="+", metavar="ETA",
                        help="max_staleness values ('unbounded' or 'null': no bound); default: 0 and the config's")
    parser.add_argument("--steps", type=int, default=24, help="training steps simulated per run (default 24)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="first steps left out of the means (default: 2 x (max_staleness + 1), at most half)")
    parser.add_argument("--seed", type=int, default=0, help="seed of lengths, filtered groups, worker order")
    parser.add_argument("--epochs", type=float, default=10.0, help="epochs the hours column is for (default 10)")
    parser.add_argument("--dataset-prompts", type=int, default=40_000,
                        help="prompts per epoch (default 40,000: the seed's DeepScaleR set)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--length-mean", type=float, default=None,
                        help="mean response length before clipping (default: generation.simulated_length_mean, "
                             "else half of generation.max_new_tokens)")
    parser.add_argument("--length-sigma", type=float, default=1.0,
                        help="sigma of the log-normal response lengths (default 1, the benchmarks'; 0: fixed)")
    parser.add_argument("--generation-json", type=Path, default=GENERATION_REPORT,
                        help="bench_generation report (default: the checked-in H100 run v3)")
    parser.add_argument("--generation-system", default="ours_compiled",
                        help="its engine system (default ours_compiled: the engine's defaults on CUDA)")
    parser.add_argument("--batch-share", type=float, default=None,
                        help="share of a decode step's fixed part that scales with the batch (skips the fit)")
    parser.add_argument("--gen-tokens-per-s", type=float, default=None,
                        help="tokens/s of one rollout engine, whatever its batch, instead of the report")
    parser.add_argument("--training-json", type=Path, default=TRAINING_REPORT,
                        help="bench_training report (default: the checked-in H100 run v6)")
    parser.add_argument("--training-row", nargs=3, default=["ours", "b", "ppo_step"],
                        metavar=("SYSTEM", "WORKLOAD", "STEP_KIND"),
                        help="its row (default: ours b ppo_step, long-tailed packs with the proximal recompute)")
    parser.add_argument("--train-tokens-per-s", type=float, default=None,
                        help="trained tokens/s of one learner rank instead of the report")
    parser.add_argument("--weight-sync-json", type=Path, default=None, help="bench_weight_sync report (default: none)")
    parser.add_argument("--weight-sync-transport", default="nccl", help="its transport rows (default nccl)")
    parser.add_argument("--weight-sync-gb-per-s", type=float, default=20.0,
                        help="publication bandwidth without a report (default 20 GB/s, an assumption)")
    parser.add_argument("--verifier-json", type=Path, default=VERIFIER_REPORT,
                        help="bench_verifier report (default: the checked-in 2-core run)")
    parser.add_argument("--reward-s", type=float, default=None, help="seconds to score one response instead")
    parser.add_argument("--host-s", type=float, default=0.0,
                        help="seconds a worker spends delivering one group (encoding, queue and controller calls)")
    parser.add_argument("--take-s", type=float, default=0.0, help="seconds the learner spends taking one group")
    parser.add_argument("--filtered-fraction", type=float, default=0.0,
                        help="share of groups dropped as zero-variance (their slots are admitted again)")
    parser.add_argument("--learner-start-s", type=float, default=0.0,
                        help="head start of the rollout workers before the learner's first step")
    parser.add_argument("--out", type=Path, default=Path("results/simulate.json"),
                        help="JSON file (default: results/simulate.json)")
    return parser


def _shown(path: Path) -> str:
    """A report's path relative to the working directory when it lies below it (no machine paths in results)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def simulation_inputs(args, config, shape) -> dict:
    """The rates of every run (the decode fit is the expensive one: computed once), with where each came from."""
    from areal_async.planning import simulate_inputs as inputs

    if args.gen_tokens_per_s is not None:
        decode = inputs.decode_cost_from_rate(args.gen_tokens_per_s)
        generation = {"tokens_per_s": args.gen_tokens_per_s}
    else:
        decode, generation = generation_from_report(args.generation_json, args.generation_system, shape,
                                                    args.batch_share)
    if args.reward_s is not None:
        reward = {"seconds_per_response": args.reward_s}
    else:
        reward = {"file": _shown(args.verifier_json), "seconds_per_response": inputs.reward_seconds(
            inputs.load_report(args.verifier_json), args.verifier_json)}
    size = inputs.model_bytes(config, shape)
    if args.weight_sync_json is not None:
        sync = {"file": _shown(args.weight_sync_json), "transport": args.weight_sync_transport,
                "seconds": inputs.weight_sync_seconds(size, inputs.load_report(args.weight_sync_json),
                                                      args.weight_sync_json, args.weight_sync_transport)}
    else:
        sync = {"gb_per_s": args.weight_sync_gb_per_s,
                "seconds": inputs.weight_sync_seconds(size, gb_per_s=args.weight_sync_gb_per_s)}
    sync["bytes"] = size
    return {"decode": decode, "generation": {**generation, "cost": asdict(decode)}, "reward": reward, "sync": sync}


def generation_from_report(path: Path, system: str, shape, batch_share: float | None = None) -> tuple:
    """The decode cost of `system` fitted from the bench_generation report at `path`, which must have measured a
    model of `shape`, and where it came from (the fitted batch share, the workloads' replayed tokens/s)."""
    from areal_async.planning import simulate_inputs as inputs

    report = inputs.load_report(path)
    inputs.check_generation_shape(report, path, shape)
    fit = inputs.fit_decode_cost(report, path, system, batch_share)
    return fit.cost, {"file": _shown(path), "system": system, "batch_share": fit.batch_share,
                      "replay_tokens_per_s": fit.replay}


def training_from_report(path: Path, row: list[str], config, shape) -> dict:
    """Tokens/s of one learner rank for `config` from the bench_training report at `path`, its `row` (system,
    workload, step kind) measured on a model of `shape`; the forward-pass factor is the config's checkpointing,
    KL reference and proximal recompute against the row's."""
    from areal_async.planning import simulate_inputs as inputs
    from areal_async.planning.memory_plan import parameter_count

    rate = inputs.training_rate(inputs.load_report(path), path, config, *row)
    if rate.parameters and abs(rate.parameters / parameter_count(shape) - 1) > inputs.SHAPE_TOLERANCE:
        raise ValueError(f"{path} measured a model of {rate.parameters:,} parameters, the config's "
                         f"has {parameter_count(shape):,}: pass --train-tokens-per-s for this model")
    return {"file": _shown(path), "row": list(row), "measured_tokens_per_s": rate.measured,
            "forward_pass_factor": rate.factor, "tokens_per_s": rate.tokens_per_s}


def training_input(args, config, shape) -> dict:
    """Tokens/s of one learner rank for `config` (its checkpointing and KL reference change the rate)."""
    if args.train_tokens_per_s is not None:
        return {"tokens_per_s": args.train_tokens_per_s}
    return training_from_report(args.training_json, args.training_row, config, shape)


def _staleness_values(args, config) -> list[int | None]:
    if args.staleness is None:
        return list(dict.fromkeys([0, config.rollout.max_staleness]))
    return [parse_staleness(text) for text in args.staleness]


def default_warmup(max_staleness: int | None, steps: int) -> int:
    """Steps left out of the means: the queue fills for max_staleness + 1 steps and the workers settle as long
    again (an unbounded run counts as 4); at most half the steps."""
    return min(steps // 2, 2 * ((4 if max_staleness is None else max_staleness) + 1))


def run_simulations(args) -> dict:
    """Every (cluster, max_staleness) run of `args`: the report written as JSON, its `runs` printed as a table."""
    from areal_async.planning.placement import model_shape
    from areal_async.run.sft import BUNDLED_WARMSTART
    from areal_async.planning.simulate_inputs import config_system, steps_for

    if args.clusters and any(o.startswith("cluster=") for o in args.overrides):
        raise ValueError("name the clusters either with --clusters or with a cluster= override, not both")
    overrides_taken = [name for name in args.clusters or [] if "=" in name]
    if overrides_taken:
        raise ValueError(f"--clusters takes names of configs/cluster/*.yaml (n1 n4 n16), got {overrides_taken}: "
                         "put overrides before --clusters")
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2, got {args.steps}")
    base = compose_config(args.config, args.overrides)
    shape, shape_source = model_shape(base.model, BUNDLED_WARMSTART)
    staleness = _staleness_values(args, base)
    shared = simulation_inputs(args, base, shape)
    generation = base.generation
    mean = args.length_mean or generation.simulated_length_mean or generation.max_new_tokens / 2
    lengths = LengthModel(mean=mean, cap=generation.max_new_tokens, sigma=args.length_sigma)
    arguments = {key: _shown(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report = {"arguments": arguments, "model": shape_source, "epochs": args.epochs,
              "dataset_prompts": args.dataset_prompts, "prompt_tokens": args.prompt_tokens, "lengths": asdict(lengths),
              "inputs": {key: value for key, value in shared.items() if key != "decode"}, "runs": []}
    for cluster in args.clusters or [None]:
        runs = []
        for eta in staleness:
            overrides = [*args.overrides, *([f"cluster={cluster}"] if cluster else []),
                         f"rollout.max_staleness={'null' if eta is None else eta}"]
            config = compose_config(args.config, overrides)
            train = training_input(args, config, shape)
            model = config_system(config, shape, shared["decode"], train["tokens_per_s"],
                                  prompt_tokens=args.prompt_tokens, lengths=lengths,
                                  weight_sync_s=shared["sync"]["seconds"],
                                  reward_s=shared["reward"]["seconds_per_response"], host_s=args.host_s,
                                  take_s=args.take_s, filtered_fraction=args.filtered_fraction,
                                  learner_start_s=args.learner_start_s)
            warmup = args.warmup if args.warmup is not None else default_warmup(eta, args.steps)
            records = simulate(model, args.steps, args.seed)
            summary = summarize(records, warmup)
            steps = steps_for(args.epochs, args.dataset_prompts, model.groups_per_step)
            runs.append({
                "cluster": cluster or f"n{config.cluster.nodes}", "nodes": config.cluster.nodes,
                "gpus": config.cluster.nodes * config.cluster.gpus_per_node,
                "max_staleness": eta, "rollout_workers": model.rollout_workers, "learner_ranks": model.learner_ranks,
                "slots": model.engine.slots, "training": train, **asdict(summary),
                "generation_idle": summary.generation_idle, "train_idle": summary.train_idle,
                "steps_for_epochs": steps, "hours": hours_for(summary, steps),
                "records": [{**asdict(r), "staleness": list(r.staleness)} for r in records],
            })
        synchronous = next((run["step_s"] for run in runs if run["max_staleness"] == 0), None)
        for run in runs:  # over max_staleness 0 on the same cluster
            run["speedup"] = None if synchronous is None else synchronous / run["step_s"]
        report["runs"] += runs
    return report


def simulation_table(report: dict) -> str:
    """The runs of a simulate report, one line each."""
    head = (f"{'cluster':>7} {'eta':>4} {'step s':>8} {'gather':>7} {'train':>7} {'sync':>5} {'gen busy':>8} "
            f"{'gen idle':>8} {'lrn idle':>8} {'traj/s':>7} {'trained tok/s':>13} {'hours':>7} {'speed-up':>8}")
    lines = [f"hours: {report['epochs']:g} epochs of {report['dataset_prompts']:,} prompts", head]
    for run in report["runs"]:
        eta = "null" if run["max_staleness"] is None else str(run["max_staleness"])
        speedup = "" if run["speedup"] is None else f"{run['speedup']:.2f}x"
        lines.append(f"{run['cluster']:>7} {eta:>4} {run['step_s']:8.1f} {run['gather_s']:7.1f} {run['train_s']:7.1f} "
                     f"{run['sync_s']:5.1f} {run['generation']['decode']:8.0%} {run['generation_idle']:8.0%} "
                     f"{run['train_idle']:8.0%} {run['trajectories_per_s']:7.1f} {run['trained_tokens_per_s']:13,.0f} "
                     f"{run['hours']:7.1f} {speedup:>8}")
    return "\n".join(lines)


def simulate_main(argv: list[str]) -> int:
    """`areal-async simulate [overrides]`: predicted step time, idle GPUs and throughput of a Ray run."""
    args = simulate_parser().parse_intermixed_args(argv)
    try:
        report = run_simulations(args)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        print(f"areal-async simulate: {config_error_line(error)}", file=sys.stderr)
        return 2
    inputs = report["inputs"]
    print(f"model: {report['model']}; prompts {report['prompt_tokens']} tokens; responses log-normal, mean "
          f"{report['lengths']['mean']:,.0f} before clipping to {report['lengths']['cap']:,}, sigma "
          f"{report['lengths']['sigma']:g}")
    print(f"{DecodeCost(**inputs['generation']['cost']).describe()} "
          f"({inputs['generation'].get('file', 'given rate')})")
    print(f"publication {inputs['sync']['seconds']:.2f} s per version; scoring "
          f"{inputs['reward']['seconds_per_response'] * 1e3:.2f} ms per response")
    for run in report["runs"]:
        print(f"{run['cluster']} max_staleness={run['max_staleness']}: {run['rollout_workers']} rollout workers of "
              f"{run['slots']} slots, {run['learner_ranks']} learner ranks at "
              f"{run['training']['tokens_per_s']:,.0f} trained tokens/s each")
        if run["rollout_workers"] + run["learner_ranks"] > run["gpus"]:
            print(f"  note: {run['rollout_workers'] + run['learner_ranks']} processes on {run['gpus']} GPUs, "
                  "simulated as if each had a GPU of its own (a what-if: `areal-async plan` refuses this layout)")
    print(simulation_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return 0
