"""Evaluate Hugging Face checkpoints on math benchmarks and aggregate the results into a table.

  areal-async eval CHECKPOINT [CHECKPOINT ...] --benchmarks math_500 aime24 amc23 gsm8k [options]
  python -m evaluation.eval_and_aggregate ...            (the same)

Writes <output-dir>/<run-name>/: samples/<benchmark>.jsonl (every sample), summary/<benchmark>.json,
settings.json, and over all checkpoints summary.json and table.md. With several checkpoints each one gets a
sub-folder <run-name>/<label>/ holding its samples/, summary/ and settings.json. Running the same command
again resumes: finished samples are not generated again.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from actors.engine_factory import ENGINE_KINDS, build_engine
from areal_async.reward.extraction import EXTRACT_MODES
from evaluation.benchmarks import (
    DATA_DIR_ENV,
    KNOWN_BENCHMARKS,
    PUBLIC_SOURCES,
    BenchmarkFormatError,
    load_benchmarks,
    write_synthetic_benchmark,
)
from evaluation.metrics import markdown_table
from areal_async.prompts import PROMPT_TYPE_NAMES
from areal_async.files import write_json_atomically
from evaluation.runner import EvalSettings, RunFolderMismatch, evaluate

EXAMPLES = f"""
benchmarks: {", ".join(sorted(KNOWN_BENCHMARKS))} (files in --data-dir), or NAME=FILE.jsonl with optional
  ,problem=FIELD ,answer=FIELD ,id=FIELD ,format=plain|after_hashes|code_tests (GSM8K-style '#### 42' answers; code problems' tests) ,title=TEXT
  ,limit=N (first N problems of that benchmark), e.g. gsm8k,limit=20
data directory: --data-dir, else ${DATA_DIR_ENV}, else ../shared/data/eval next to the repository.
  Public sources: {PUBLIC_SOURCES}.

examples:
  areal-async eval --write-synthetic 200 /tmp/synthetic200.jsonl
  areal-async eval areal_async/assets/arith-warmstart --benchmarks synthetic=/tmp/synthetic200.jsonl \\
      --prompt-type boxed --num-samples 4 --temperature 1.0 --top-p 1.0 --max-gen-tokens 16 --output-dir /tmp/eval
  areal-async eval /ckpt/R1-Distill-Qwen-1.5B --benchmarks math_500 aime24 amc23 --num-samples 32 \\
      --temperature 0.6 --top-p 0.95 --max-gen-tokens 32768 --prompt-type r1_distilled --engine vllm
"""


class EngineNotAvailable(RuntimeError):
    """The chosen generation engine cannot be used in this installation."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = EvalSettings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     usage="%(prog)s CHECKPOINT [CHECKPOINT ...] --benchmarks BENCH [BENCH ...] "
                                     "[options]\n       %(prog)s --write-synthetic N PATH",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="Hugging Face checkpoint folders (one table row each)")
    parser.add_argument("--benchmarks", nargs="+", default=[], metavar="BENCH", help="benchmarks to run")
    parser.add_argument("--data-dir", help=f"folder of the benchmark files (default: ${DATA_DIR_ENV} or "
                        "../shared/data/eval next to the repository)")
    parser.add_argument("--limit", type=int,
                        help="only the first N problems of each benchmark (per benchmark: NAME,limit=N)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples, help="samples per problem (n)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="<= 0: greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0: no top-k truncation")
    parser.add_argument("--max-gen-tokens", type=int, default=defaults.max_gen_tokens, help="new tokens per sample")
    parser.add_argument("--prompt-type", choices=PROMPT_TYPE_NAMES, default=defaults.prompt_type,
                        help="r1_distilled: DeepSeek-R1-Distill chat format; orz: Open-Reasoner-Zero template "
                        "(answer in <answer></answer>); boxed: the synthetic task's 'Q: ...\\nA: '; none: raw text")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generation seeds derive from it")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="requests per generate call")
    parser.add_argument("--engine", choices=ENGINE_KINDS, default="torch", help="generation engine")
    parser.add_argument("--device", default="auto", help="torch engine device (auto: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--extract-mode", default="auto", choices=EXTRACT_MODES,
                        help="how the verifier takes the answer from a response")
    parser.add_argument("--verifier-workers", type=int, default=2, help="sandboxed judging processes")
    parser.add_argument("--verifier-timeout", type=float, default=5.0, help="seconds per judged answer")
    parser.add_argument("--output-dir", default="outputs/eval", help="parent of the run folder")
    parser.add_argument("--run-name", help="run folder name (default: from checkpoint and settings, so the same "
                        "command resumes)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--write-synthetic", nargs=2, metavar=("N", "PATH"),
                        help="write N held-out synthetic arithmetic problems as a benchmark JSONL and exit")
    parser.add_argument("--synthetic-seed", type=int, default=1, help="seed of --write-synthetic (1 = the "
                        "trainer's held-out problems)")
    return parser


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


def open_engine(kind: str, checkpoint: str, tokenizer, dtype: str, device: str, seed: int):
    """`actors.engine_factory.build_engine` for `checkpoint`, padding with `tokenizer`'s pad id; an engine that
    cannot be imported here (vLLM absent) is an EngineNotAvailable, reported as a command-line error."""
    try:
        return build_engine(kind, checkpoint, dtype, device, pad_token_id=tokenizer.pad_token_id, seed=seed)
    except ImportError as error:
        raise EngineNotAvailable(f"--engine {kind} is not available here: {error}") from error


def checkpoint_labels(paths: list[str]) -> list[str]:
    """A short, file-name-safe label per checkpoint: its folder name, with the parent's when names repeat."""
    resolved = [Path(p).resolve() for p in paths]
    names = [p.name for p in resolved]
    labels = []
    for path, name in zip(resolved, names):
        label = f"{path.parent.name}-{name}" if names.count(name) > 1 else name
        labels.append(re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "checkpoint")
    if len(set(labels)) != len(labels):
        labels = [f"{i}-{label}" for i, label in enumerate(labels)]
    return labels


def default_run_name(labels: list[str], settings: EvalSettings, limit: int | None = None) -> str:
    """From the checkpoint labels and the sampling settings, so the same command finds (and resumes) its folder."""
    model = labels[0] if len(labels) == 1 else f"{labels[0]}+{len(labels) - 1}"
    return (f"{model}-{settings.prompt_type}-n{settings.num_samples}-t{settings.temperature:g}"
            f"-p{settings.top_p:g}-m{settings.max_gen_tokens}-s{settings.seed}" + (f"-l{limit}" if limit else ""))


def settings_caption(settings: EvalSettings) -> str:
    return (f"Averaged pass@1 (%) ± standard error over problems; {settings.num_samples} samples per problem, "
            f"temperature {settings.temperature:g}, top-p {settings.top_p:g}, at most {settings.max_gen_tokens} "
            f"new tokens, prompt type `{settings.prompt_type}`, seed {settings.seed}.")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except (BenchmarkFormatError, FileNotFoundError, RunFolderMismatch, EngineNotAvailable, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.write_synthetic:
        count, path = args.write_synthetic
        written = write_synthetic_benchmark(path, int(count), seed=args.synthetic_seed)
        print(f"wrote {count} held-out synthetic problems to {written}")
        if not args.checkpoints:
            return 0
    if not args.checkpoints:
        parser.error("give at least one checkpoint folder")
    if not args.benchmarks:
        parser.error("give --benchmarks")
    for text in args.benchmarks:
        if (Path(text) / "config.json").is_file():
            parser.error(f"{text} looks like a checkpoint folder: put checkpoints before --benchmarks")
    for checkpoint in args.checkpoints:
        if not (Path(checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint}: not a Hugging Face checkpoint folder (no config.json)")
    settings = EvalSettings(
        num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_gen_tokens=args.max_gen_tokens, prompt_type=args.prompt_type, seed=args.seed, batch_size=args.batch_size,
    )
    benchmarks = load_benchmarks(args.benchmarks, args.data_dir, args.limit)

    from areal_async.config import ExtractMode, RewardConfig, RewardKind
    from areal_async.model import load_config, load_tokenizer
    from areal_async.reward import build_verifier

    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    labels = checkpoint_labels(args.checkpoints)
    run_dir = Path(args.output_dir) / (args.run_name or default_run_name(labels, settings, args.limit))
    reward = RewardConfig(num_workers=args.verifier_workers, timeout_s=args.verifier_timeout,
                          extract_mode=ExtractMode(args.extract_mode))
    results: dict[str, dict] = {}
    started = time.perf_counter()
    # one verifier per task the benchmarks have: math answers, and code tests run in the code sandbox (a program
    # gets at least 10 s)
    configs = {"math": reward,
               "code": replace(reward, kind=RewardKind.code, timeout_s=max(args.verifier_timeout, 10.0))}
    with contextlib.ExitStack() as stack:
        verifier = {task: stack.enter_context(build_verifier(configs[task]))
                    for task in sorted({benchmark.spec.task for benchmark in benchmarks})}
        for label, checkpoint in zip(labels, args.checkpoints):
            folder = run_dir if len(labels) == 1 else run_dir / label
            tokenizer = load_tokenizer(checkpoint)
            try:
                max_context = load_config(checkpoint).max_position_embeddings
            except (ValueError, KeyError, TypeError):
                max_context = None
            engine = open_engine(args.engine, checkpoint, tokenizer, dtype, device, args.seed)
            identity = {"checkpoint": str(Path(checkpoint).resolve()), "engine": args.engine, "dtype": dtype,
                        "extract_mode": args.extract_mode}
            print(f"evaluating {checkpoint} -> {folder}")
            summaries = evaluate(engine, tokenizer, verifier, benchmarks, settings, out_dir=folder,
                                 show_progress=not args.no_progress, identity=identity, max_context=max_context)
            results[label] = {"path": str(checkpoint), "folder": str(folder), "benchmarks": summaries}
            del engine
    names = [b.name for b in benchmarks]
    table = markdown_table({label: r["benchmarks"] for label, r in results.items()}, names,
                           {b.name: b.spec.title for b in benchmarks}, caption=settings_caption(settings))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "table.md").write_text(table, encoding="utf-8")
    write_json_atomically(run_dir / "summary.json", {
        "run_dir": str(run_dir),
        "settings": asdict(settings),
        "benchmarks": names,
        "checkpoints": results,
        "wall_seconds": round(time.perf_counter() - started, 3),
    })
    print(table)
    print(f"samples, summaries and table in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
