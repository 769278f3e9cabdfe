"""Throughput of code rewards: responses per second through the code sandbox on `--workers` slots.

Responses: MBPP sanitized's 427 reference programs (`<data>/code/mbpp_sanitized.jsonl`) in a fenced block, each
judged by its own assertions (3 for most tasks) with `code_verdict`, as a training run's reward would; then the
same programs with their bodies emptied (failing: the cost of a wrong answer), and HumanEval's 164 reference
solutions. Each set is timed over `--repeats` passes after one warm pass; responses/s = responses / median wall.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_code_sandbox.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_code_sandbox.py --workers 4 --limit 100

Prints a table and writes JSON (default `results/bench_code_sandbox.json`, run from the repository root).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from areal_async.reward.code_reward import CodeVerdict
from areal_async.reward.code_sandbox import CodeSandbox
from areal_async.reward.code_tests import code_verdict, with_bodies_emptied
from harness import print_markdown_table, script_parser, write_report

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def timed_pass(jobs: list[tuple[str, dict]], sandbox: CodeSandbox, workers: int) -> tuple[float, list[CodeVerdict]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(lambda job: code_verdict(job[0], job[1], sandbox), jobs))
    return time.perf_counter() - started, verdicts


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="sandbox slots and concurrent verdicts")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per set (median)")
    parser.add_argument("--limit", type=int, default=None, help="the first N tasks of each file")
    parser.add_argument("--out", default="results/bench_code_sandbox.json", help="JSON file; default: %(default)s")
    args = parser.parse_args()
    code_dir = args.data / "code"
    if not code_dir.is_dir():
        print(f"bench_code_sandbox: {code_dir} not found (--data)", file=sys.stderr)
        return 2
    mbpp = [json.loads(line) for line in (code_dir / "mbpp_sanitized.jsonl").read_text().splitlines()][: args.limit]
    humaneval = [json.loads(line) for line in (code_dir / "humaneval.jsonl").read_text().splitlines()][: args.limit]
    sets = {
        "mbpp_reference": [(fenced(t["code"]), t) for t in mbpp],
        "mbpp_emptied": [(fenced(with_bodies_emptied(t["code"])), t) for t in mbpp],
        "humaneval_reference": [(fenced(t["prompt"] + t["canonical_solution"]), t) for t in humaneval],
    }
    sandbox = CodeSandbox(slots=args.workers)
    report = {"workers": args.workers, "cpus": os.cpu_count(), "repeats": args.repeats,
              "network_isolated": sandbox.network_isolated, "unprivileged_uids": bool(sandbox.uids), "sets": {}}
    try:
        for name, jobs in sets.items():
            timed_pass(jobs, sandbox, args.workers)  # warm: interpreter pages, the pool's threads
            walls, verdicts = [], []
            for _ in range(args.repeats):
                wall, verdicts = timed_pass(jobs, sandbox, args.workers)
                walls.append(wall)
            wall = statistics.median(walls)
            row = {"responses": len(jobs), "tests": sum(v.total for v in verdicts),
                   "all_passed": sum(v.all_passed for v in verdicts), "wall_s": walls,
                   "responses_per_s": len(jobs) / wall, "tests_per_s": sum(v.total for v in verdicts) / wall}
            report["sets"][name] = row
            print(f"[{name}] {row['responses']} responses ({row['tests']} tests, {row['all_passed']} all passed): "
                  f"{row['responses_per_s']:.1f} responses/s, {row['tests_per_s']:.1f} tests/s", flush=True)
    finally:
        sandbox.close()
    print_markdown_table(
        ["set", "responses", "tests", "all passed", f"responses/s ({args.workers} workers)", "tests/s"],
        [[name, row["responses"], row["tests"], row["all_passed"], f"{row['responses_per_s']:.1f}",
          f"{row['tests_per_s']:.1f}"] for name, row in report["sets"].items()])
    write_report(report, args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
