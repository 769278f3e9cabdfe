"""Accuracy statistics over sampled responses: unbiased pass@k, averaged pass@1 with its standard error,
and the per-benchmark summary built from the sample records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k).

    This is the probability that at least one of k samples drawn without replacement from the n is
    correct. It is computed as 1 - prod_{i=n-c+1..n} (1 - k / i), which never forms the (huge) binomial
    coefficients. Requires 0 <= c <= n and 1 <= k <= n.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def averaged_pass_at_1(correct_by_problem: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """Averaged pass@1 and its standard error over problems.

    `correct_by_problem[i]` holds the correctness of every sample of problem i (at least one each). With
    m_i the mean correctness of problem i and P problems:
        pass@1 = (1/P) sum_i m_i
        stderr = std(m_1..m_P, ddof=1) / sqrt(P)     (0.0 when P == 1)
    The standard error therefore measures the spread over problems (the benchmark's sampling error given
    the per-problem accuracies), not the spread over samples. When every problem has the same number of
    samples, pass@1 equals the mean correctness over all samples.
    """
    if not correct_by_problem:
        raise ValueError("no problems to average over")
    means = []
    for index, samples in enumerate(correct_by_problem):
        if len(samples) == 0:
            raise ValueError(f"problem {index} has no samples")
        means.append(sum(bool(s) for s in samples) / len(samples))
    count = len(means)
    mean = sum(means) / count
    if count == 1:
        return mean, 0.0
    variance = sum((m - mean) ** 2 for m in means) / (count - 1)
    return mean, math.sqrt(variance) / math.sqrt(count)


def summarize_samples(samples: Sequence[Mapping[str, Any]], num_samples: int) -> dict[str, Any]:
    """The per-benchmark summary of sample records (dicts with problem_index, sample_index, correct,
    num_tokens, finish_reason, extracted_answer), `num_samples` of them per problem.

    Returns pass@1 with its standard error (see `averaged_pass_at_1`), pass@k for k = 1..num_samples
    (unbiased estimator, averaged over problems), the mean response length in tokens, the fraction of
    responses cut off by the token limit (finish_reason "length") and the fraction with an extracted answer.
    """
    if not samples:
        raise ValueError("no samples to summarize")
    by_problem: dict[int, list[bool]] = {}
    for sample in samples:
        by_problem.setdefault(int(sample["problem_index"]), []).append(bool(sample["correct"]))
    uneven = {index: len(c) for index, c in by_problem.items() if len(c) != num_samples}
    if uneven:
        first = next(iter(uneven.items()))
        raise ValueError(f"expected {num_samples} samples per problem; problem index {first[0]} has {first[1]}")
    ordered = [by_problem[index] for index in sorted(by_problem)]
    pass1, stderr = averaged_pass_at_1(ordered)
    pass_k = {
        str(k): sum(pass_at_k(num_samples, sum(c), k) for c in ordered) / len(ordered)
        for k in range(1, num_samples + 1)
    }
    return {
        "num_problems": len(ordered),
        "num_samples": num_samples,
        "pass@1": pass1,
        "pass@1_stderr": stderr,
        "pass@k": pass_k,
        "mean_response_tokens": sum(int(s["num_tokens"]) for s in samples) / len(samples),
        "truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
        "extracted_fraction": sum(s["extracted_answer"] is not None for s in samples) / len(samples),
    }


def markdown_table(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    benchmarks: Sequence[str],
    display_names: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> str:
    """A Markdown table with one row per checkpoint and one column per benchmark.

    `results[checkpoint][benchmark]` is a summary from `summarize_samples`; each cell shows averaged pass@1
    in percent with its standard error ("43.5 ± 2.1"), or "–" where that pair was not evaluated.
    `caption` (e.g. the sampling settings) is written as a line under the table.
    """
    names = display_names or {}
    header = ["checkpoint"] + [names.get(b, b) for b in benchmarks]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(benchmarks)) + "|"]
    for checkpoint, by_benchmark in results.items():
        cells = [_escape_cell(checkpoint)]
        for benchmark in benchmarks:
            summary = by_benchmark.get(benchmark)
            if summary is None:
                cells.append("–")
            else:
                cells.append(f"{100 * summary['pass@1']:.1f} ± {100 * summary['pass@1_stderr']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if caption:
        text += f"\n{caption}\n"
    return text


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")
