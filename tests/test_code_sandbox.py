"""The code sandbox against hostile programs: each ends within its limit + 1 s, fails, leaves no process or file
behind and does not touch the host, and the pool keeps serving. The isolation that needs root (a uid per slot,
the process limit, the network namespace) is tested where the suite runs as root, as CI does."""

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from areal_async.reward.code_sandbox import CodeSandbox, SandboxLimits, _processes_of, execution_status

LIMITS = SandboxLimits(wall_s=2.0, cpu_s=2, memory_bytes=512 << 20, output_bytes=1 << 16, processes=16)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own per execution needs root")


@pytest.fixture(scope="module")
def sandbox():
    pool = CodeSandbox(slots=2, limits=LIMITS)
    yield pool
    pool.close()


def _run(sandbox, code: str, stdin: bytes = b""):
    started = time.perf_counter()
    result = sandbox.run(code, stdin)
    assert time.perf_counter() - started <= LIMITS.wall_s + 1.0, result
    return result


def _no_leftovers(sandbox) -> None:
    assert len(sandbox.uids) == 2 and all(not _processes_of(uid) for uid in sandbox.uids)
    assert not [name for name in os.listdir("/tmp") if name.startswith("sandbox-escape")]


def test_a_program_runs_with_its_stdin_and_an_empty_environment(sandbox):
    result = _run(sandbox, "import os, sys\nprint(sys.stdin.read()[::-1], sorted(set(os.environ) - {'LC_CTYPE'}))",
                  b"abc")
    assert (result.status, result.exit_code, result.stdout) == ("ok", 0, b"cba []\n")
    failed = _run(sandbox, "import sys\nprint('before')\nsys.exit(3)")
    assert (failed.status, failed.exit_code, failed.stdout) == ("error", 3, b"before\n")


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "timeout"),
    "sleep(3600)": ("import time\ntime.sleep(3600)", "timeout"),
    "memory bomb": ("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))", "error"),
    "1 GB of output": ("import sys\nfor _ in range(16384):\n    sys.stdout.write('x' * 65536)", "output_limit"),
    "reading the parent's environment": ("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", "error"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_fail_within_their_limit_and_the_pool_serves_on(sandbox, name):
    code, status = HOSTILE[name]
    assert _run(sandbox, code).status == status
    assert len(_run(sandbox, "print('still serving')").stdout) > 0


def test_the_cpu_limit_ends_a_busy_program_as_a_timeout():
    # the CPU limit well before the wall clock: before, the hard limit's SIGKILL made this an "error"
    pool = CodeSandbox(slots=1, limits=SandboxLimits(wall_s=10.0, cpu_s=1, memory_bytes=512 << 20))
    try:
        result = pool.run("while True:\n    pass", b"")
    finally:
        pool.close()
    assert (result.status, result.exit_code) == ("timeout", -signal.SIGXCPU)


def test_an_exit_code_reads_as_a_status():
    assert [execution_status(code) for code in (0, None, 1, -signal.SIGKILL, -signal.SIGXCPU)] == [
        "ok", "ok", "error", "error", "timeout"]


@needs_root
def test_a_fork_bomb_is_stopped_and_leaves_no_process(sandbox):
    result = _run(sandbox, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "timeout"
    _no_leftovers(sandbox)
    assert _run(sandbox, "import os\nos.fork() or print('forks again')").stdout == b"forks again\n"


@needs_root
def test_a_daemon_does_not_outlive_the_call_nor_leave_files(sandbox):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    open('/tmp/sandbox-escape-daemon', 'w')\n"
            "    time.sleep(60)\n    open('/tmp/sandbox-escape-late', 'w')\nelse:\n    time.sleep(0.2)\n    print('left it')")
    assert _run(sandbox, code).stdout == b"left it\n"
    _no_leftovers(sandbox)


@needs_root
def test_the_host_is_untouched(sandbox, tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("mine")
    for code in (f"open({str(tmp_path / 'written.txt')!r}, 'w').write('x')",  # outside its directory
                 f"import os\nos.remove({str(kept)!r})",  # deleting the run's files
                 "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",  # killing the parent
                 "import os, signal\nos.kill(1, signal.SIGKILL)"):
        assert _run(sandbox, code).status == "error"
    assert kept.read_text() == "mine" and not (tmp_path / "written.txt").exists()
    _no_leftovers(sandbox)


@needs_root
def test_no_network_where_a_namespace_can_be_made(sandbox):
    if not sandbox.network_isolated:
        pytest.skip("this kernel gives no network namespace: the sandbox said so at start")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        port = listener.getsockname()[1]
        result = _run(sandbox, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('in')")
        assert result.status == "error" and b"in" not in result.stdout
    finally:
        listener.close()


def test_its_working_directory_is_its_own_and_goes_away(sandbox):
    result = _run(sandbox, "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = Path(result.stdout.decode().strip())
    assert result.status == "ok" and workdir.name.startswith("areal-sandbox-") and not workdir.exists()


@needs_root
def test_pools_never_share_a_uid(sandbox):
    other = CodeSandbox(slots=2, limits=LIMITS)
    try:
        assert not set(other.uids) & set(sandbox.uids)
    finally:
        other.close()


def test_a_program_that_never_reads_a_large_stdin_still_times_out(sandbox):
    result = _run(sandbox, "import time\ntime.sleep(3600)", b"x" * (4 << 20))  # far more than a pipe holds
    assert result.status == "timeout"
