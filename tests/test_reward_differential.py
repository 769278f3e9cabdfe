"""The verifier against math-verify on rewrites of real gold answers (a sample of benchmarks/bench_verifier.py's
full run: the first golds of every data file), and its throughput on long responses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"no data at {DATA}")
def test_agreement_with_math_verify_on_gold_rewrites(tmp_path):
    out = tmp_path / "verifier.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_verifier.py"), "--limit", "40",
                           "--throughput-responses", "300", "--data-dir", str(DATA), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    agreement = report["agreement"]
    assert agreement["golds"] == 6 * 40 - 10 and agreement["cases"] > 2000  # AIME 2024 has 30 problems
    assert agreement["judged_by_math_verify"] > 0.99 * agreement["cases"]
    assert agreement["agreement"] >= 0.99, agreement["disagreements"][:10]
    assert agreement["ours_matches_expected"] >= 0.99
    assert report["throughput"]["responses_per_s"] > 0
