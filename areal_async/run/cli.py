"""`areal-async`: train, build the synthetic task's warm start, evaluate checkpoints on benchmarks, or plan a
run's placement and GPU memory. Options of train, sft and plan are hydra overrides (key=value);
`areal-async eval --help`, `areal-async plan --help` list their flags."""

from __future__ import annotations

import argparse
import sys
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
  areal-async train --config staleness_4     # a staleness ablation (configs/staleness_*.yaml)
  areal-async train --cfg          # print the resolved config and exit
  areal-async sft steps=3000       # rebuild the bundled warm start
  areal-async eval CHECKPOINT --benchmarks math_500 aime24 amc23 gsm8k   # see areal-async eval --help
  areal-async plot outputs/run_a outputs/run_b --window 10 --out curves.png   # see areal-async plot --help
  areal-async plan --config recipe_1.5B cluster=n4 generation.max_new_tokens=24000   # see areal-async plan --help
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command_at is not None and argv[command_at] == "eval":  # eval's own flags, not hydra overrides
        return eval_main(argv[:command_at] + argv[command_at + 1 :], prog="areal-async eval")
    if command_at is not None and argv[command_at] == "plot":
        return plot_main(argv[:command_at] + argv[command_at + 1 :])
    if command_at is not None and argv[command_at] == "plan":
        return plan_main(argv[:command_at] + argv[command_at + 1 :])
    parser = argparse.ArgumentParser(
        prog="areal-async", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["train", "sft", "eval", "plot", "plan"],
                        help="what to run (eval, plot, plan: see areal-async eval --help, areal-async plot --help, "
                             "areal-async plan --help)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides key=value (see configs/<command>.yaml)")
    parser.add_argument("--config", help="config file in configs/ to start from (default: the command's name), "
                        "e.g. staleness_4")
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
