"""`areal-async`: train, build the synthetic task's warm start, evaluate checkpoints on benchmarks, plan a
run's placement and GPU memory, simulate its throughput, or run the staleness ablation. Options of train, sft,
plan and simulate are hydra overrides (key=value); `areal-async eval --help`, `areal-async plan --help`,
`areal-async simulate --help`, `areal-async ablate --help` list their flags."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from areal_async.config import register_configs
from areal_async.plots import CURVES_FILE, plot_runs
from evaluation.eval_and_aggregate import main as eval_main

EPILOG = """
options are hydra overrides, for example:
  areal-async train total_steps=100 rollout.groups_per_step=64 ppo.lr=5e-5
  areal-async train model.path=/ckpt/qwen data.kind=areal_jsonl data.path=prompts.jsonl
  areal-async train --config async_cpu rollout.max_staleness=2   # Ray: workers generate while the learner trains
  areal-async train --cfg          # print the resolved config and exit
  areal-async sft steps=3000       # rebuild the bundled warm start
  areal-async eval CHECKPOINT --benchmarks math_500 aime24 amc23 gsm8k   # see areal-async eval --help
  areal-async plot outputs/run_a outputs/run_b --window 10 --out curves.png   # see areal-async plot --help
  areal-async plan --config recipe_1.5B cluster=n4 generation.max_new_tokens=24000   # see areal-async plan --help
  areal-async simulate --config recipe_1.5B --clusters n1 n4 n16    # see areal-async simulate --help
  areal-async ablate --staleness 0 4 --seeds 1     # staleness x objective grid; see areal-async ablate --help
"""

PLAN_EPILOG = """
The plan needs no GPU and no weights: the model's shape comes from model.path's config.json, else from the
built-in model.shape. It exits with 0 when every GPU fits cluster.gpu_memory_gib, 1 when one does not (the
report names the GPU, its parts and what would make it fit), 2 for a configuration it cannot lay out.

examples:
  areal-async plan --config recipe_1.5B cluster=n16 generation.max_new_tokens=8192
  areal-async plan --config recipe_1.5B cluster=n1 generation.max_new_tokens=24000 engine.kv_memory_gib=null
  areal-async plan --config recipe_7B_zero cluster=n16 model.path=/ckpt/Qwen2.5-7B cluster.gpu_memory_gib=79.2
  areal-async plan --config gpu_demo        # one GPU, engine and learner in one process
"""


ABLATE_EPILOG = """
Each cell (one max_staleness, one objective, one seed) is `areal-async train --config <base config>` with the grid
file's overrides, the ones given here, total_steps=--steps and its own rollout.max_staleness, ppo.objective and
seed; its run folder is OUT/staleness_<eta>-<objective>-seed_<seed>/ (train.log holds its output). OUT/ablation.json
records every cell's overrides.

Calling it again with the same OUT resumes the grid: finished cells (summary.json) are skipped, a cell that
stopped mid-run continues from its last run checkpoint (checkpoint_every), or runs again from the start when it
wrote none. Cells can be added later (more seeds, other values); the shared settings must stay the same.

At the end (and with --report) OUT/ablation.md holds the table and OUT/ablation.png the plot: held-out accuracy
after the last step and trained trajectories/s against max_staleness, one line per objective, mean ± sample
standard deviation over seeds.

examples:
  areal-async ablate                                   # configs/ablation/cpu.yaml: 7 bounds x 2 objectives x 2 seeds
  areal-async ablate --staleness 0 4 unbounded --objectives decoupled --seeds 1 2 3 --steps 20
  areal-async ablate --out outputs/ablation-small rollout.groups_per_step=16   # overrides of every run
  areal-async ablate --grid gpu                        # configs/ablation/gpu.yaml: one GPU, configs/gpu_demo.yaml
  areal-async ablate --report outputs/ablation-cpu     # the table and PNG again, from the folder alone
"""


def compose_config(config_name: str, overrides: list[str]):
    """Composes configs/<config_name>.yaml with overrides into its typed dataclass."""
    register_configs()
    with initialize_config_module(config_module="configs", version_base=None):
        composed = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_object(composed)


def plot_main(argv: list[str]) -> int:
    """`areal-async plot RUN_DIR [RUN_DIR ...]`: the runs' training curves, overlaid, in one PNG."""
    parser = argparse.ArgumentParser(
        prog="areal-async plot",
        description="Reward and response length against step (moving averages), held-out accuracy and benchmark "
                    "pass@1 of the periodic evaluations, for one run or several overlaid.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (each with its metrics.jsonl)")
    parser.add_argument("--window", type=int, default=1, help="moving-average window in steps (default 1: none)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG (default: training_curves.png in the run folder, or curves.png for several)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"no metrics.jsonl in {', '.join(missing)}")
    if args.window < 1:
        parser.error(f"--window must be at least 1, got {args.window}")
    out = args.out or (args.run_dirs[0] / CURVES_FILE if len(args.run_dirs) == 1 else Path("curves.png"))
    print(f"wrote {plot_runs(args.run_dirs, out, args.window)}")
    return 0


def plan_main(argv: list[str]) -> int:
    """`areal-async plan [overrides]`: the placement and per-GPU memory of a run, from its config alone."""
    from areal_async.placement import model_shape, plan_run
    from areal_async.run.sft import BUNDLED_WARMSTART

    parser = argparse.ArgumentParser(
        prog="areal-async plan", epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Which node and GPU every learner rank and rollout worker gets, where the replay-queue shards "
                    "live, and each GPU's memory (learner state, activations, engine weights and KV cache) for "
                    "the stage's sequence length, checked against cluster.gpu_memory_gib.")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value, as for train")
    parser.add_argument("--config", default="train",
                        help="config file in configs/ to start from (default: train), e.g. recipe_1.5B")
    parser.add_argument("--prompt-tokens", type=int, default=1024,
                        help="the longest prompt in tokens: a sequence is this plus generation.max_new_tokens "
                             "(default 1024)")
    args = parser.parse_intermixed_args(argv)
    try:
        config = compose_config(args.config, args.overrides)
        shape, source = model_shape(config.model, BUNDLED_WARMSTART)
        plan = plan_run(config, shape, source, args.prompt_tokens)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        print(f"areal-async plan: bad configuration: {error}{cause}", file=sys.stderr)
        return 2
    print(plan.describe())
    return 0 if plan.fits else 1


BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GENERATION_REPORT = BENCHMARK_RESULTS / "bench_generation_h100_2026-11-25_v3.json"
TRAINING_REPORT = BENCHMARK_RESULTS / "bench_training_h100_2026-11-25_v6.json"
VERIFIER_REPORT = BENCHMARK_RESULTS / "bench_verifier_cpu2_2026-12-05.json"

SIMULATE_EPILOG = """
Where the rates come from (each can be given instead, which skips its report):
  generation    --generation-json (bench_generation): a decode step's cost, fixed + per slot + per slot and
                cache position, fitted from results.step_ms_<system>, <system>_fixed and <system>_longtail
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
        description="A discrete-event model of a Ray run of the config (areal_async/simulate.py): rollout workers "
                    "decoding admitted groups with continuous batching, the staleness rule, the replay queue, "
                    "learner ranks training and publishing every version. Predicts wall time per step, idle GPU "
                    "time, trained tokens/s and trajectories/s, synchronous against asynchronous.")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value, as for train")
    parser.add_argument("--config", default="recipe_1.5B", help="config file in configs/ (default: recipe_1.5B)")
    parser.add_argument("--clusters", nargs="+", metavar="NAME",
                        help="cluster configs to compare (configs/cluster/NAME.yaml, e.g. n1 n4 n16); default: "
                             "the config's own")
    parser.add_argument("--staleness", nargs="+", metavar="ETA",
                        help="max_staleness values ('null': unbounded); default: 0 and the config's")
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
    parser.add_argument("--generation-system", default="ours_compiled_sdpa",
                        help="its engine system (default ours_compiled_sdpa: in run v3, today's default engine)")
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
    from areal_async import simulate_inputs as inputs

    if args.gen_tokens_per_s is not None:
        decode = inputs.decode_cost_from_rate(args.gen_tokens_per_s)
        generation = {"tokens_per_s": args.gen_tokens_per_s}
    else:
        report = inputs.load_report(args.generation_json)
        inputs.check_generation_shape(report, args.generation_json, shape)
        fit = inputs.fit_decode_cost(report, args.generation_json, args.generation_system, args.batch_share)
        decode = fit.cost
        generation = {"file": _shown(args.generation_json), "system": args.generation_system,
                      "batch_share": fit.batch_share, "replay_tokens_per_s": fit.replay}
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


def training_input(args, config, shape) -> dict:
    """Tokens/s of one learner rank for `config` (its checkpointing and KL reference change the rate)."""
    from areal_async import simulate_inputs as inputs
    from areal_async.memory_plan import parameter_count

    if args.train_tokens_per_s is not None:
        return {"tokens_per_s": args.train_tokens_per_s}
    report = inputs.load_report(args.training_json)
    rate = inputs.training_rate(report, args.training_json, config, *args.training_row)
    if rate.parameters and abs(rate.parameters / parameter_count(shape) - 1) > inputs.SHAPE_TOLERANCE:
        raise ValueError(f"{args.training_json} measured a model of {rate.parameters:,} parameters, the config's "
                         f"has {parameter_count(shape):,}: pass --train-tokens-per-s for this model")
    return {"file": _shown(args.training_json), "row": args.training_row, "measured_tokens_per_s": rate.measured,
            "forward_pass_factor": rate.factor, "tokens_per_s": rate.tokens_per_s}


def _staleness_values(args, config) -> list[int | None]:
    if args.staleness is None:
        return list(dict.fromkeys([0, config.rollout.max_staleness]))
    values = []
    for text in args.staleness:
        if text == "null":
            values.append(None)
        elif text.isdigit():
            values.append(int(text))
        else:
            raise ValueError(f"--staleness takes integers >= 0 or 'null', got {text!r}")
    return values


def default_warmup(max_staleness: int | None, steps: int) -> int:
    """Steps left out of the means: the queue fills for max_staleness + 1 steps and the workers settle as long
    again (an unbounded run counts as 4); at most half the steps."""
    return min(steps // 2, 2 * ((4 if max_staleness is None else max_staleness) + 1))


def run_simulations(args) -> dict:
    """Every (cluster, max_staleness) run of `args`: the report written as JSON, its `runs` printed as a table."""
    from areal_async.placement import model_shape
    from areal_async.run.sft import BUNDLED_WARMSTART
    from areal_async.simulate import LengthModel, hours_for, simulate, summarize
    from areal_async.simulate_inputs import config_system, steps_for

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
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        print(f"areal-async simulate: {error}{cause}", file=sys.stderr)
        return 2
    inputs = report["inputs"]
    print(f"model: {report['model']}; prompts {report['prompt_tokens']} tokens; responses log-normal, mean "
          f"{report['lengths']['mean']:,.0f} before clipping to {report['lengths']['cap']:,}, sigma "
          f"{report['lengths']['sigma']:g}")
    cost = inputs["generation"]["cost"]
    print(f"decode step: {cost['fixed_s'] * 1e3:.3f} ms + {cost['per_slot_s'] * 1e6:.3f} us per slot + "
          f"{cost['per_kv_s'] * 1e9:.3f} ns per slot and cache position; prefill "
          f"{cost['prefill_token_s'] * 1e6:.2f} us per token ({inputs['generation'].get('file', 'given rate')})")
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


def ablate_main(argv: list[str]) -> int:
    """`areal-async ablate`: the staleness x objective grid of training runs, and its table and plot."""
    from areal_async.run.ablate import (grid_cells, open_grid, parse_staleness, run_grid, shared_overrides,
                                        staleness_label, write_report)
    from areal_async.run.trainer import validate

    parser = argparse.ArgumentParser(
        prog="areal-async ablate", epilog=ABLATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The staleness ablation: training runs for every max_staleness x objective (decoupled, naive) "
                    "x seed of a grid file (configs/ablation/<grid>.yaml), one after another, then a table and a "
                    "plot of held-out accuracy and throughput against max_staleness.")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value of every run")
    parser.add_argument("--grid", default="cpu",
                        help="the grid file configs/ablation/<grid>.yaml (default: cpu, Ray on a CPU; gpu: one GPU)")
    parser.add_argument("--staleness", nargs="+", metavar="ETA",
                        help="only these max_staleness values of the grid (integers, 'unbounded')")
    parser.add_argument("--objectives", nargs="+", metavar="OBJECTIVE",
                        help="only these objectives of the grid (decoupled, naive)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="the seeds of every setting (the train config's seed; default: the grid file's)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the grid file's)")
    parser.add_argument("--out", type=Path, help="the grid folder (default: outputs/ablation-<grid>)")
    parser.add_argument("--report", type=Path, metavar="GRID_DIR",
                        help="only write GRID_DIR's table and plot from its finished runs")
    args = parser.parse_intermixed_args(argv)
    if args.report is not None:
        given = [flag for flag, value in (("overrides", args.overrides), ("--staleness", args.staleness),
                                          ("--objectives", args.objectives), ("--seeds", args.seeds),
                                          ("--steps", args.steps), ("--out", args.out)) if value]
        if given:
            parser.error(f"--report reads a finished grid folder: it takes no {', '.join(given)}")
        try:
            print(write_report(args.report))
        except FileNotFoundError as error:
            parser.error(str(error))
        print(f"wrote {args.report / 'ablation.md'} and the plot beside it")
        return 0
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        grid = compose_config(f"ablation/{args.grid}", [])
        staleness = list(grid.max_staleness)
        if args.staleness:
            chosen = list(dict.fromkeys(parse_staleness(text) for text in args.staleness))
            unknown = [staleness_label(eta) for eta in chosen if eta not in staleness]
            if unknown:
                raise ValueError(f"--staleness {' '.join(unknown)}: not in the grid {args.grid} "
                                 f"({' '.join(staleness_label(eta) for eta in staleness)})")
            staleness = chosen
        objectives = [objective.value for objective in grid.objectives]
        if args.objectives:
            unknown = [name for name in args.objectives if name not in objectives]
            if unknown:
                raise ValueError(f"--objectives {' '.join(unknown)}: not in the grid {args.grid} "
                                 f"({' '.join(objectives)})")
            objectives = list(dict.fromkeys(args.objectives))
        shared = shared_overrides(grid.overrides, args.overrides,
                                  args.steps if args.steps is not None else grid.steps)
        cells = grid_cells(staleness, objectives, list(dict.fromkeys(args.seeds or grid.seeds)))
        out = args.out or Path("outputs") / f"ablation-{args.grid}"
        for cell in cells:  # every run's configuration is checked before the first one starts
            try:
                validate(compose_config(grid.base_config, [*shared, *cell.overrides(), f"output_dir={out}",
                                                           f"run_name={cell.name}"]))
            except (HydraException, OmegaConfBaseException, ValueError) as error:
                raise ValueError(f"run {cell.name}: {error}") from error.__cause__
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        print(f"areal-async ablate: bad configuration: {error}{cause}", file=sys.stderr)
        return 2
    try:
        manifest = open_grid(out, grid.base_config, shared, cells)
    except ValueError as error:
        print(f"areal-async ablate: {error}", file=sys.stderr)
        return 2
    print(f"{len(cells)} runs of --config {grid.base_config} {' '.join(shared)} in {out}", flush=True)
    failed = run_grid(out, manifest, cells, log=lambda line: print(line, flush=True))  # often sent to a file
    print(write_report(out))
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    if failed:
        print(f"areal-async ablate: {len(failed)} runs failed ({', '.join(failed)}); their train.log says why, "
              "and the same command runs them again", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command_at is not None and argv[command_at] == "eval":  # eval's own flags, not hydra overrides
        return eval_main(argv[:command_at] + argv[command_at + 1 :], prog="areal-async eval")
    if command_at is not None and argv[command_at] == "plot":
        return plot_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "plan":
        return plan_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "simulate":
        return simulate_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "ablate":
        return ablate_main(argv[:command_at] + argv[command_at + 1 :])
    parser = argparse.ArgumentParser(
        prog="areal-async", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["train", "sft", "eval", "plot", "plan", "simulate", "ablate"],
                        help="what to run (eval, plot, plan, simulate, ablate: see areal-async eval --help, "
                             "areal-async plot --help, areal-async plan --help, areal-async simulate --help, "
                             "areal-async ablate --help)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value (see configs/<command>.yaml)")
    parser.add_argument("--config", help="config file in configs/ to start from (default: the command's name), "
                        "e.g. async_cpu")
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_intermixed_args(argv)
    try:
        config = compose_config(args.config or args.command, args.overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        print(f"areal-async {args.command}: bad configuration: {error}{cause}", file=sys.stderr)
        return 2
    if args.cfg:
        print(OmegaConf.to_yaml(OmegaConf.structured(config)))
        return 0
    if args.command == "train":
        from areal_async.run.trainer import GenerationFailed, RunStopped, run_training

        try:
            run_training(config, show_progress=not args.no_progress)
        except (GenerationFailed, RunStopped) as error:  # the message says what happened and what to do
            print(f"areal-async train: {error}", file=sys.stderr)
            return 1
    else:
        from areal_async.run.sft import run_sft

        print(f"warm start written to {run_sft(config, show_progress=not args.no_progress)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
