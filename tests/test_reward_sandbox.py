"""The sandboxed worker pool: hostile answers, hung and crashed workers, parallelism, shutdown."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from areal_async.reward import RewardVerifier, SandboxError, Verdict, math_reward
from areal_async.reward import verifier as verifier_module

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def verifier():
    """A 2-worker verifier with a short timeout, warmed up so that timings exclude worker start."""
    with RewardVerifier(num_workers=2, timeout_s=TIMEOUT_S) as pool_verifier:
        assert pool_verifier.score_batch([r"\boxed{1}", r"\boxed{2}"], [["1"], ["2"]]) == [5.0, 5.0]
        yield pool_verifier


@pytest.fixture
def default_verifier(verifier, monkeypatch):
    """Route the module-level math_reward / is_equivalent through the short-timeout verifier."""
    monkeypatch.setattr(verifier_module, "_default_verifier", verifier)
    return verifier


def _worker_pids(pool_verifier: RewardVerifier) -> set[int]:
    return set(pool_verifier._pool.pids)


def _gone(pid: int, within_s: float = 3.0) -> bool:
    """Whether the process has exited and been reaped (no zombie left) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                time.sleep(0.05)
                continue
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_score_batch_in_input_order(verifier):
    responses = [r"\boxed{3}", "The answer is 4.", r"\boxed{\frac{1}{2}}", "no idea", r"$\pi$", r"\boxed{(1,2)}"]
    golds = [["3"], ["5"], ["0.5"], ["1"], [r"\pi", "3.14"], ["(2,1)"]]
    assert verifier.score_batch(responses, golds) == [5.0, -5.0, 5.0, -5.0, 5.0, -5.0]
    assert verifier.score(r"\boxed{7}", ["6", "7"]) == 5.0  # any gold may match
    assert verifier.score_batch([], []) == []
    with pytest.raises(ValueError):
        verifier.score_batch(["1"], [])


def test_custom_rewards_and_extract_mode():
    with RewardVerifier(num_workers=1, correct_reward=1.0, incorrect_reward=0.0, extract_mode="last_number") as v:
        assert v.score(r"\boxed{4} and then 5", ["5"]) == 1.0
        assert v.score(r"\boxed{4} and then 5", ["4"]) == 0.0


@pytest.mark.parametrize(
    "response",
    [
        r"\boxed{9^9^9^9}",
        r"\boxed{9^{9^{9^{9}}}}",
        r"\boxed{(10^{999})^{10^{999}}}",
        r"\boxed{x^{10^{100}}}",
        "\\boxed{" + "9" * 1_000_000 + "}",
        "Let me think. " * 75_000,
        "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        r"\boxed{__import__('os').system('echo hi')}",
        r"\boxed{lambda: 0}",
        "\\boxed{" + "x<" * 400 + "1}",
        r"\boxed{x^{10^{100}} > 9^{9^{9^9}}}",
        "\\boxed{" + "x \\approx " * 200 + "1}",
        "\\boxed{" + "(a,b)=" * 150 + "(1,2)}",
    ],
    ids=["tower", "braced-tower", "huge-power", "huge-exponent", "1MB-number", "1MB-text", "parentheses",
         "braces", "import", "lambda", "relation-chain", "huge-inequality", "approximation-chain", "label-chain"],
)  # fmt: skip
def test_hostile_answers_score_incorrect_in_time(default_verifier, response):
    start = time.monotonic()
    assert math_reward(response, ["0"]) == -5.0
    assert time.monotonic() - start < TIMEOUT_S + 1.0


def test_model_text_is_never_executed(default_verifier, tmp_path):
    marker = tmp_path / "pwned"
    for answer in [f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')"]:
        assert math_reward(f"\\boxed{{{answer}}}", ["0"]) == -5.0
        assert verifier_module.is_equivalent(answer, "0") is False
    assert not marker.exists()


def test_hung_worker_is_killed_and_replaced(verifier):
    before = _worker_pids(verifier)
    start = time.monotonic()
    assert verifier._run_debug_tasks(["_debug_hang"]) == [Verdict(False, "timeout")]
    elapsed = time.monotonic() - start
    assert TIMEOUT_S * 0.9 < elapsed < TIMEOUT_S + 1.0
    after = _worker_pids(verifier)
    (killed,) = before - after
    assert len(after) == 2 and _gone(killed)
    assert verifier.score(r"\boxed{42}", ["42"]) == 5.0


def test_crashed_worker_is_replaced(verifier):
    before = _worker_pids(verifier)
    start = time.monotonic()
    assert verifier._run_debug_tasks(["_debug_crash"]) == [Verdict(False, "worker_died")]
    assert time.monotonic() - start < 1.0  # a death is noticed at once, not at the timeout
    after = _worker_pids(verifier)
    (crashed,) = before - after
    assert len(after) == 2 and _gone(crashed)
    assert verifier.score(r"\boxed{42}", ["42"]) == 5.0


def test_batch_runs_in_parallel(verifier):
    start = time.monotonic()
    assert [v.value for v in verifier._run_debug_tasks(["_debug_hang", "_debug_hang"])] == [False, False]
    assert time.monotonic() - start < 1.8 * TIMEOUT_S


def test_other_tasks_proceed_while_one_hangs(verifier):
    tasks = [
        ("equivalent", ("1", "1", {})),
        ("_debug_hang", None),
        ("equivalent", ("1", "2", {})),
        ("_debug_crash", None),
        ("equivalent", ("3", "3.0", {})),
    ]
    assert verifier._pool.run(tasks) == [Verdict(True), Verdict(False, "timeout"), Verdict(False),
                                         Verdict(False, "worker_died"), Verdict(True)]


def _address_space_limit(pid: int) -> str:
    """The soft RLIMIT_AS of a process, as /proc shows it."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line for line in limits if line.startswith("Max address space")).split()[3]


def test_workers_have_a_memory_cap(verifier):
    if not Path("/proc/self/limits").exists():
        pytest.skip("no /proc on this system")
    expected = str(1024 * 1024 * 1024)
    deadline = time.monotonic() + 5.0  # a just-replaced worker sets its limit as it starts
    while {_address_space_limit(pid) for pid in _worker_pids(verifier)} != {expected}:
        assert time.monotonic() < deadline, "worker memory limit not applied"
        time.sleep(0.05)


def test_close_stops_workers():
    with RewardVerifier(num_workers=2) as pool_verifier:
        assert pool_verifier.is_equivalent("0.5", r"\frac12") is True
        pids = _worker_pids(pool_verifier)
    assert pool_verifier.closed and all(_gone(pid) for pid in pids)
    with pytest.raises(SandboxError):
        pool_verifier.score(r"\boxed{1}", ["1"])
    pool_verifier.close()  # idempotent


def test_invalid_configuration():
    with pytest.raises(ValueError):
        RewardVerifier(extract_mode="nonsense")
    with pytest.raises(ValueError):
        RewardVerifier(num_workers=0)


def test_failures_are_counted_apart_from_incorrect_answers():
    with RewardVerifier(num_workers=1, timeout_s=TIMEOUT_S, memory_limit_mb=512) as pool_verifier:
        verdicts = pool_verifier.verify_batch([r"\boxed{3}", r"\boxed{4}"], [["3"], ["5"]])
        assert verdicts == [Verdict(True), Verdict(False)] and not pool_verifier.failures
        assert pool_verifier._run_debug_tasks(["_debug_allocate"], 4096) == [Verdict(False, "out_of_memory")]
        assert pool_verifier._run_debug_tasks(["_debug_allocate"], 8) == [Verdict(True)]  # the worker survives
        hostile = "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}"
        (verdict,) = pool_verifier.verify_batch([hostile], [["1"]])
        assert verdict == Verdict(False, "unparsed")  # deeper than the parser goes: not known to be wrong
        unreadable = pool_verifier.verify_batch([r"\boxed{\mystery{3}}", r"\boxed{\mystery{3}}", "no answer"],
                                                [["3"], [r"\mystery{3}"], ["3"]])
        assert unreadable == [Verdict(False, "unparsed"), Verdict(True), Verdict(False)]
        assert pool_verifier.failures == {"unparsed": 2}


def test_a_cap_too_small_to_verify_is_an_error_naming_it():
    with pytest.raises(SandboxError, match="memory cap of 5 MB .*reward.memory_limit_mb"):
        RewardVerifier(num_workers=1, memory_limit_mb=5)


def _run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_script_without_a_main_guard_can_score(tmp_path):
    """Workers never import the caller's main module (multiprocessing's spawn and forkserver would)."""
    result = _run_script(tmp_path, """
        from areal_async.reward import math_reward
        print("reward", math_reward(r"\\boxed{x^2+2x+1}", ["(x+1)^2"]))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["reward 5.0"]


def test_the_cap_applies_to_a_clean_process(tmp_path):
    """A main that imports torch (gigabytes of address space on GPU images) leaves the workers' cap untouched."""
    result = _run_script(tmp_path, """
        import torch
        from areal_async.reward import RewardVerifier

        if __name__ == "__main__":
            with RewardVerifier(num_workers=2, memory_limit_mb=600) as verifier:
                print("reward", verifier.score(r"\\boxed{x^2+2x+1}", ["(x+1)^2"]), dict(verifier.failures))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["reward 5.0 {}"]
