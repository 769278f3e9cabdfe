"""`areal-async`: train, build the synthetic task's warm start, evaluate checkpoints on benchmarks, plan a
run's placement and GPU memory, simulate its throughput, or run the staleness ablation. Options of train, sft,
plan and simulate are hydra overrides (key=value); `areal-async eval --help`, `areal-async plan --help`,
`areal-async simulate --help`, `areal-async ablate --help` list their flags."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from areal_async.config import register_configs
from areal_async.errors import InputError
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
  areal-async verify --kind code responses.jsonl   # each response's reward and why; see areal-async verify --help
  areal-async config --list        # every key with its type, default and comment (docs/configuration.md)
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


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of `node` that the dataclass `schema` does not declare (hydra's `+key=value` adds keys
    that the typed config would otherwise drop without a word)."""
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            unknown.append(path)
            continue
        kind = next((t for t in typing.get_args(hints[key]) if dataclasses.is_dataclass(t)), hints[key])
        child = node._get_node(key)
        if dataclasses.is_dataclass(kind) and isinstance(child, DictConfig) and not child._is_none():
            unknown += unknown_keys(child, kind, f"{path}.")
    return unknown


_HYDRA_BOOKKEEPING = re.compile(
    r"\s*(full_key:|reference_type=|object_type=|To append to your config use|See https://)")


def config_error_line(error: BaseException) -> str:
    """A configuration error (hydra's, OmegaConf's or a value check's) and its cause as one line: without the config
    search path, OmegaConf's key bookkeeping (the override names the key) or hydra's pointers to its docs, and a
    group's available options on the same line."""
    text = f"{error}\n{error.__cause__ or ''}".split("Config search path:")[0]
    text = re.sub(r"Available options in '([^']+)':((?:\n\t[^\n]*)+)",
                  lambda found: f"available for {found[1]}: {', '.join(found[2].split())}", text)
    lines = [line.strip().rstrip(".") for line in text.splitlines()]
    return "; ".join(line for line in lines if line and not _HYDRA_BOOKKEEPING.match(line))


def compose_config(config_name: str, overrides: list[str]):
    """Composes configs/<config_name>.yaml with overrides into its typed dataclass; a key the dataclass does
    not declare is a ValueError naming it, whatever the override's prefix."""
    register_configs()
    with initialize_config_module(config_module="configs", version_base=None):
        composed = compose(config_name=config_name, overrides=overrides)
    unknown = unknown_keys(composed, OmegaConf.get_type(composed))
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (--cfg prints every key)")
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
    from areal_async.planning.placement import model_shape, plan_run
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
        print(f"areal-async plan: bad configuration: {config_error_line(error)}", file=sys.stderr)
        return 2
    print(plan.describe())
    return 0 if plan.fits else 1


def ablate_main(argv: list[str]) -> int:
    """`areal-async ablate`: the staleness x objective grid of training runs, and its table and plot."""
    from areal_async.run.ablate import chosen, grid_cells, open_grid, run_grid, shared_overrides, write_report
    from areal_async.actor_system.staleness import parse_staleness, staleness_label
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
        staleness = chosen("--staleness", [parse_staleness(text) for text in args.staleness or []],
                           list(grid.max_staleness), args.grid, staleness_label)
        objectives = chosen("--objectives", args.objectives, [objective.value for objective in grid.objectives],
                            args.grid)
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
        print(f"areal-async ablate: bad configuration: {config_error_line(error)}", file=sys.stderr)
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


def config_main(argv: list[str]) -> int:
    """`areal-async config --list [--sft]`: every key with its type, default and comment."""
    from areal_async.config import SFTConfig, TrainConfig
    from areal_async.config_reference import as_text, config_keys

    parser = argparse.ArgumentParser(prog="areal-async config", description=config_main.__doc__,
                                     epilog="The same keys as tables: docs/configuration.md.")
    parser.add_argument("--list", action="store_true", required=True, help="print every key of the train config")
    parser.add_argument("--sft", action="store_true", help="the sft config's keys instead")
    args = parser.parse_args(argv)
    print(as_text(config_keys(SFTConfig if args.sft else TrainConfig)))
    return 0


def command_help(command: str) -> str:
    """`areal-async train --help` / `sft --help`: the config files it can start from, the sections and groups of
    its config, and how to see every key."""
    import configs  # the package compose_config reads

    from areal_async.config import SFTConfig, TrainConfig

    folder = Path(configs.__file__).parent
    schema = TrainConfig if command == "train" else SFTConfig
    starts = sorted(path.stem for path in folder.glob("*.yaml")
                    if ("sft_schema" in path.read_text()) == (command == "sft"))
    hints = typing.get_type_hints(schema)
    sections = [name for name, kind in hints.items() if dataclasses.is_dataclass(kind)]
    lines = [f"usage: areal-async {command} [--config NAME] [--cfg] [--no-progress] [key=value ...]", "",
             f"Composes configs/<NAME>.yaml (default: {command}) with hydra overrides key=value and runs it; an",
             "unknown key or a bad value stops it at once with one line naming the key.", "",
             f"config files (--config): {', '.join(starts)}",
             f"sections (section.key=value): {', '.join(sections)}"]
    if command == "train":
        clusters = sorted((path.stem for path in (folder / "cluster").glob("*.yaml")), key=lambda n: (len(n), n))
        lines.append(f"groups: cluster={'|'.join(clusters)} (nodes of 8 GPUs, with cluster.placement=ray)")
    lines += ["", "every key and its value: areal-async " + command + " --cfg [--config NAME] [key=value ...]",
              "every key with its type, default and comment: areal-async config --list"
              + (" --sft" if command == "sft" else ""),
              "", EPILOG.strip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command_at is not None and argv[command_at] in ("train", "sft") and ({"-h", "--help"} & set(argv)):
        print(command_help(argv[command_at]))
        return 0
    if command_at is not None and argv[command_at] == "eval":  # eval's own flags, not hydra overrides
        return eval_main(argv[:command_at] + argv[command_at + 1 :], prog="areal-async eval")
    if command_at is not None and argv[command_at] == "plot":
        return plot_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "plan":
        return plan_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "simulate":
        from areal_async.run.simulation import simulate_main

        return simulate_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "ablate":
        return ablate_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "verify":
        from areal_async.run.verify import verify_main

        return verify_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "config":
        return config_main(argv[:command_at] + argv[command_at + 1 :])
    parser = argparse.ArgumentParser(
        prog="areal-async", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["train", "sft", "eval", "plot", "plan", "simulate", "ablate", "verify",
                                            "config"],
                        help="what to run (eval, plot, plan, simulate, ablate, verify, config: see areal-async eval "
                             "--help, areal-async plot --help, areal-async plan --help, areal-async simulate --help, "
                             "areal-async ablate --help, areal-async verify --help, areal-async config --help)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value (see configs/<command>.yaml)")
    parser.add_argument("--config", help="config file in configs/ to start from (default: the command's name), "
                        "e.g. async_cpu")
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_intermixed_args(argv)
    try:
        config = compose_config(args.config or args.command, args.overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        print(f"areal-async {args.command}: bad configuration: {config_error_line(error)}", file=sys.stderr)
        return 2
    if args.cfg:
        print(OmegaConf.to_yaml(OmegaConf.structured(config)))
        return 0
    try:
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
    except (InputError, FileNotFoundError) as error:  # a file, line, key or folder the user can fix
        print(f"areal-async {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
