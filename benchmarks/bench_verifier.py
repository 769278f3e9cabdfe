"""The reward verifier against math-verify on rewrites of real gold answers, and its throughput.

Gold answers: every line of MATH-500, AIME 2024, AMC 2023 and GSM8K (`<data>/eval/`) and of the DeepScaleR
training sample (`<data>/train/`). For each gold, `areal_async.reward.variants.answer_variants` writes
responses that state an equal answer in another form and near-misses. Each (response, gold) gets our verdict
(the sandboxed RewardVerifier, 2 workers) and math-verify's (`verify(parse("$gold$"), parse(response))`);
agreement is counted where math-verify returns a verdict (it parsed both sides). Disagreements are listed with
their rewrite's name. Throughput: responses of about 6,000 characters (reasoning text ending in a boxed
answer) scored on 2 workers.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_verifier.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_verifier.py --limit 100   # the first 100 golds per file

math-verify is a test-only dependency (the `dev` extra). Prints a table and writes JSON (default
`results/bench_verifier.json`, run from the repository root).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

from areal_async.reward import RewardVerifier
from areal_async.reward.variants import answer_variants
from harness import print_markdown_table, script_parser, timed, write_report

ROOT = Path(__file__).resolve().parents[1]
GOLD_FILES = {
    "math500": "eval/math500.jsonl", "aime24": "eval/aime24.jsonl", "amc23": "eval/amc23.jsonl",
    "gsm8k": "eval/gsm8k_test.jsonl", "deepscaler_aime": "train/deepscaler_aime_1983_2023.jsonl",
    "deepscaler_math": "train/deepscaler_math_train_every8th.jsonl",
}


def gold_answer(record: dict) -> str:
    """The record's final answer as text (GSM8K: after '####'; AMC's floats: 27.0 -> '27')."""
    answer = record["answer"]
    if isinstance(answer, float):
        return str(int(answer)) if answer.is_integer() else str(answer)
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip().replace(",", "") if "####" in answer else answer.strip()


def load_golds(data_dir: Path, limit: int | None) -> list[tuple[str, str]]:
    golds = []
    for name, relative in GOLD_FILES.items():
        lines = (data_dir / relative).read_text(encoding="utf-8").splitlines()[:limit]
        golds += [(name, gold_answer(json.loads(line))) for line in lines if line.strip()]
    return golds


def math_verify_verdict(response: str, gold: str) -> bool | None:
    """math-verify's verdict, or None when it parsed nothing on one side."""
    from math_verify import parse, verify

    parsed_gold, parsed_response = parse(f"${gold}$"), parse(response)
    if not parsed_gold or not parsed_response:
        return None
    return bool(verify(parsed_gold, parsed_response))


def agreement(golds: list[tuple[str, str]], verifier: RewardVerifier) -> dict:
    cases = [(source, gold, response, expected, rewrite)
             for source, gold in golds for response, expected, rewrite in answer_variants(gold)]
    ours, ours_seconds = timed(lambda: verifier.check_batch([c[2] for c in cases], [[c[1]] for c in cases]))
    judged = agreed = 0
    by_rewrite: Counter = Counter()
    disagreements = []
    for (source, gold, response, expected, rewrite), our_verdict in zip(cases, ours):
        theirs = math_verify_verdict(response, gold)
        if theirs is None:
            continue
        judged += 1
        if our_verdict == theirs:
            agreed += 1
        else:
            by_rewrite[rewrite] += 1
            disagreements.append({"source": source, "gold": gold, "response": response, "rewrite": rewrite,
                                  "ours": our_verdict, "math_verify": theirs, "expected": expected})
    return {
        "golds": len(golds), "cases": len(cases), "judged_by_math_verify": judged, "agreed": agreed,
        "agreement": agreed / max(1, judged), "ours_seconds": ours_seconds,
        "ours_matches_expected": sum(o == c[3] for o, c in zip(ours, cases)) / max(1, len(cases)),
        "disagreements_by_rewrite": dict(by_rewrite.most_common()), "disagreements": disagreements,
    }


def long_response(rng: random.Random, answer: str, characters: int) -> str:
    """Reasoning-like text of about `characters` characters ending in a boxed answer."""
    sentences = []
    while sum(len(s) for s in sentences) < characters:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        sentences.append(f"Next we compute ${a} \\times {b} = {a * b}$, and so the partial sum becomes "
                         f"$\\frac{{{a}}}{{{b}}} + {a}$. ")
    return "".join(sentences)[:characters] + f"\n\nTherefore the answer is $\\boxed{{{answer}}}$."


def throughput(verifier: RewardVerifier, count: int, characters: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    answers = [str(rng.randint(1, 10**6)) for _ in range(count)]
    responses = [long_response(rng, answer, characters) for answer in answers]
    golds = [[answer if i % 2 else str(int(answer) + 1)] for i, answer in enumerate(answers)]
    verifier.check_batch(responses[:50], golds[:50])  # warm
    verdicts, seconds = timed(lambda: verifier.check_batch(responses, golds))
    assert verdicts == [bool(i % 2) for i in range(count)], "throughput responses were scored wrongly"
    return {"responses": count, "characters": sum(map(len, responses)) / count, "seconds": seconds,
            "responses_per_s": count / seconds}


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--limit", type=int, default=None, help="golds per file (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--throughput-responses", type=int, default=4000)
    parser.add_argument("--characters", type=int, default=6000)
    parser.add_argument("--show", type=int, default=40, help="disagreements to print")
    parser.add_argument("--out", default="results/bench_verifier.json", help="JSON file; default: %(default)s")
    args = parser.parse_args()
    report = {"args": {**vars(args), "data_dir": os.path.relpath(args.data_dir, ROOT)}}  # no machine paths
    with RewardVerifier(num_workers=args.workers) as verifier:
        report["agreement"] = agreement(load_golds(Path(args.data_dir), args.limit), verifier)
        report["throughput"] = throughput(verifier, args.throughput_responses, args.characters)
    result, speed = report["agreement"], report["throughput"]
    for case in result["disagreements"][: args.show]:
        print(f"[{case['rewrite']}] gold {case['gold']!r} response {case['response'][-70:]!r}: ours {case['ours']}, "
              f"math-verify {case['math_verify']}")
    print_markdown_table(
        ["golds", "cases", "judged by math-verify", "agreement", "ours = expected",
         f"responses/s ({args.workers} workers, {speed['characters']:,.0f} chars)"],
        [[result["golds"], result["cases"], result["judged_by_math_verify"], f"{100 * result['agreement']:.2f}%",
          f"{100 * result['ours_matches_expected']:.2f}%", f"{speed['responses_per_s']:,.0f}"]])
    print("disagreements by rewrite:", result["disagreements_by_rewrite"])
    write_report(report, args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
