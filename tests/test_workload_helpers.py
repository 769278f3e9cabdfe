"""The pieces the GPU demo and the end-to-end benchmark stand on: worked-steps demonstrations, a byte tokenizer
padded to a real vocabulary, the long-tailed token limits, and the benchmark's CPU mode."""

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from actors.sampling import long_tailed_limit
from areal_async.data.records import PromptRecord
from areal_async.data.synthetic import noisy_demonstration, worked_steps
from areal_async.model.tokenizer import build_byte_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_worked_steps_are_running_totals_left_to_right():
    assert worked_steps("37+45-12") == (["37+45=82", "82-12=70"], 70)
    assert worked_steps("5-9+1") == (["5-9=-4", "-4+1=-3"], -3)
    # a slip of +10 in the first step is carried on by the second
    assert worked_steps("37+45-12", error_at=0, error=10) == (["37+45=92", "92-12=80"], 80)
    assert worked_steps("37+45-12", error_at=1, error=-1) == (["37+45=82", "82-12=69"], 69)
    with pytest.raises(ValueError, match="'\\+' and '-' only"):
        worked_steps("3*4+1")


def test_worked_demonstrations_end_in_their_last_total():
    record = PromptRecord("q", "Q: 37+45-12\nA: ", ("\\boxed{70}",))
    assert noisy_demonstration(record, random.Random(0), 0.0, steps=True) == "37+45=82, 82-12=70. \\boxed{70}"
    slipped = [noisy_demonstration(record, random.Random(seed), 1.0, steps=True) for seed in range(20)]
    for text in slipped:
        steps, boxed = text.removesuffix("}").split(". \\boxed{")
        last = steps.split(", ")[-1]
        assert last.endswith(f"={boxed}") and boxed != "70"  # the slip reaches the answer
    assert noisy_demonstration(record, random.Random(0), 0.0) == "\\boxed{70}"


def test_byte_tokenizer_padded_to_a_real_vocabulary(tmp_path):
    tokenizer = load_tokenizer(build_byte_tokenizer(tmp_path / "tok", vocab_size=1000))
    assert len(tokenizer) == 1000
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (997, 998, 999)
    text = "Q: 37+45\nA: "
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256  # text never encodes to a filler
    assert tokenizer.decode(ids) == text
    fillers = tokenizer.convert_ids_to_tokens(list(range(256, 997)))
    assert all(len(filler) == 3 for filler in fillers) and len(set(fillers)) == len(fillers)
    with pytest.raises(ValueError, match="at least 259"):
        build_byte_tokenizer(tmp_path / "small", vocab_size=100)


def test_long_tailed_limits_are_keyed_clipped_and_near_their_mean():
    assert long_tailed_limit(2048, 16, 8192, "7:g1:3") == long_tailed_limit(2048, 16, 8192, "7:g1:3")
    limits = [long_tailed_limit(2048, 16, 8192, f"seed:{i}") for i in range(4000)]
    assert min(limits) >= 16 and max(limits) == 8192  # sigma 1 reaches the cap
    assert len(set(limits)) > 1000
    # log-normal (sigma 1) with mean 2048 has median 2048 / e^0.5 = 1242; the cap takes a little off the mean
    assert statistics.median(limits) == pytest.approx(1242, rel=0.06)
    assert 1700 < statistics.mean(limits) < 2048


def test_end_to_end_benchmark_runs_on_a_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_end_to_end.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"i", "ii"} and not report["errors"]
    for result in report["results"].values():
        summary = result["summary"]
        assert summary["ledger_balanced"] and summary["rollout_weights_identical"]
        assert summary["generation_errors"] == 0 and not summary["reward_failures"]
        assert summary["consumed"] == 3 * 4  # steps x groups per step
        assert result["overhead_ratio"] > 0 and result["trained_tokens_per_s_per_gpu"] > 0
    assert "| i |" in done.stdout and "| ii |" in done.stdout
