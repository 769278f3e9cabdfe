"""Benchmark evaluation: averaged pass@1 (and pass@k) on MATH-500, AIME 2024, AMC 2023, GSM8K and the synthetic
task, through the project's engine interface and sandboxed verifier. The command line is
``areal-async eval`` (evaluation/eval_and_aggregate.py); :func:`evaluate` is the in-process entry point."""

from evaluation.benchmarks import (
    KNOWN_BENCHMARKS,
    Benchmark,
    BenchmarkFormatError,
    BenchmarkSpec,
    Problem,
    default_data_dir,
    load_benchmark,
    load_benchmarks,
    parse_benchmark_arg,
    write_synthetic_benchmark,
)
from evaluation.metrics import averaged_pass_at_1, markdown_table, pass_at_k, summarize_samples
from areal_async.prompts import PROMPT_FORMATS, judged_text
from evaluation.runner import EvalSettings, RunFolderMismatch, evaluate

__all__ = [
    "KNOWN_BENCHMARKS",
    "PROMPT_FORMATS",
    "Benchmark",
    "BenchmarkFormatError",
    "BenchmarkSpec",
    "EvalSettings",
    "Problem",
    "RunFolderMismatch",
    "averaged_pass_at_1",
    "default_data_dir",
    "evaluate",
    "judged_text",
    "load_benchmark",
    "load_benchmarks",
    "markdown_table",
    "parse_benchmark_arg",
    "pass_at_k",
    "summarize_samples",
    "write_synthetic_benchmark",
]
