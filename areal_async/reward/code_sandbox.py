"""Runs untrusted Python (model-written code) under limits and returns what it printed and how it ended.

Each execution, in `CodeSandbox.run`:
- a fresh temporary directory holding the code as `main.py`, deleted afterwards; `python -I` (isolated mode: no
  user site-packages, no PYTHON* variables) in an empty environment, started in a session of its own;
- as root (CI and the GPU machines run as root, where RLIMIT_NPROC does not bind), an unprivileged uid of its own
  (each pool slot claims one from `UID_BASE` up, through a lock file, so pools in several processes never share
  one), so the process limit binds (a fork bomb stops) and every process the code leaves,
  also one that started a session of its own, is killed after the call by a process of that uid signalling
  all of them (kill(-1));
- limits: CPU seconds (past them the run ends as a timeout), address space, file size, open files, processes, no
  core files;
- no network: a network namespace of its own (unshare(CLONE_NEWNET)) where the kernel lets root make one;
  `CodeSandbox.network_isolated` says whether it does, and the sandbox prints a warning naming the fallback (the
  host's network) at start when it does not;
- a wall-clock limit: on timeout the session is killed, then every process of the slot's uid;
- stdout and stderr captured up to `max_output_bytes` each; more ends the execution (status "output_limit");
- after the call, files the slot's uid left in the world-writable places (/tmp, /var/tmp, /dev/shm) are removed.

What it does not isolate: it is a sandbox for model outputs, not for an adversary with kernel exploits. The code
can read whatever the file system lets any user read, and use the CPU and memory its limits allow. Without root
(a developer's machine) there is no uid of its own: the process limit does not bind per execution, and only the
session is killed after the call, so a process that starts a session of its own can outlive it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

UID_BASE = 61000  # slots run as uids from here up (no passwd entry needed), each claimed by a lock file
UID_COUNT = 4096
CLONE_NEWNET = 0x40000000
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")
READ_CHUNK = 65536
T = TypeVar("T")


@dataclass(frozen=True)
class SandboxLimits:
    """Per execution: wall-clock and CPU seconds, address space, file size and captured output (bytes), open
    files, processes (of the slot's uid)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    output_bytes: int = 1 << 20
    open_files: int = 64
    processes: int = 32

    @classmethod
    def of(cls, timeout_s: float, memory_limit_mb: int) -> "SandboxLimits":
        """The limits a run's reward settings give (reward.timeout_s, reward.memory_limit_mb)."""
        return cls(wall_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_bytes=memory_limit_mb << 20)


@dataclass(frozen=True)
class Execution:
    """How an execution ended. status: "ok" (exit code 0), "error" (another exit code or a signal), "timeout" (the
    wall clock or the CPU seconds), "output_limit"; exit_code: the process's (negative: the signal that ended it;
    None when killed by us)."""

    status: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    seconds: float


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _probe_network_namespace() -> bool:
    """Whether a child can get a network namespace of its own here (root, and a kernel that allows it)."""
    if os.geteuid() != 0:
        return False
    try:
        result = subprocess.run([sys.executable, "-I", "-c", "pass"], preexec_fn=_unshare_network,
                                capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _unshare_network() -> None:
    if _libc().unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")


def execution_status(exit_code: int | None) -> str:
    """The status of a program that ended by itself with `exit_code` (None: still running when killed by the
    caller): "ok" for 0 or None, "timeout" for the CPU limit's SIGXCPU, "error" for another code or signal."""
    if exit_code in (0, None):
        return "ok"
    return "timeout" if exit_code == -signal.SIGXCPU else "error"


def _child_setup(limits: SandboxLimits, uid: int | None, isolate_network: bool) -> None:
    """In the child, between fork and exec: the network namespace (needs root), the limits, then the uid."""
    if isolate_network:
        _unshare_network()
    # the hard CPU limit a second above the soft one: the soft one's SIGXCPU, not the hard one's SIGKILL, ends a
    # busy program, so its end reads as a timeout (execution_status)
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    for name, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                        (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(name, (value, value))
    if uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _processes_of(uid: int) -> list[tuple[int, int, str]]:
    """(pid, parent pid, state) of every process whose real uid is `uid`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:  # it ended meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            found.append((int(entry.name), int(fields["PPid"]), fields["State"][:1]))
    return found


def _kill_uid(uid: int, attempts: int = 50) -> None:
    """Kills every process of `uid` (sessions of their own too): a child that takes the uid signals them all;
    the orphans come back to this process (a child subreaper) and are reaped here, so none lingers as a zombie
    that would count against the next execution's process limit."""
    for _ in range(attempts):  # a fork bomb's last forks can land between passes; RLIMIT_NPROC bounds them
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        left = _processes_of(uid)
        for child, parent, _ in left:
            if parent == os.getpid():
                try:
                    os.waitpid(child, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not _processes_of(uid):
            return
        time.sleep(0.01)


def _remove_files_of(uid: int, roots: tuple[str, ...] = WORLD_WRITABLE) -> None:
    """Removes what `uid` created directly under the world-writable `roots` (the only places it could write)."""
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _claim_uid() -> tuple[int, int]:
    """A uid no other slot of any process on this machine holds, and the lock file's descriptor that holds it
    (closed with the sandbox: the lock goes with it, also when the process dies)."""
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        descriptor = os.open(os.path.join(tempfile.gettempdir(), f"areal-sandbox-uid-{uid}.lock"),
                             os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, descriptor
        except BlockingIOError:
            os.close(descriptor)
    raise RuntimeError(f"every sandbox uid from {UID_BASE} to {UID_BASE + UID_COUNT - 1} is taken")


def _feed(stream, data: bytes) -> None:
    """Writes `data` to the program's stdin and closes it; a program that exits (or closes it) first ends this."""
    try:
        stream.write(data)
        stream.close()
    except OSError:
        pass


class _Capture(threading.Thread):
    """Reads a pipe until it closes, keeping at most `limit` bytes; `exceeded` once more arrived."""

    def __init__(self, stream, limit: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.limit, self.data, self.exceeded = stream, limit, bytearray(), threading.Event()

    def run(self) -> None:
        while chunk := self.stream.read1(READ_CHUNK):
            room = self.limit - len(self.data)
            self.data += chunk[:max(0, room)]
            if len(chunk) > room:
                self.exceeded.set()
                return


def system_python() -> str:
    """An interpreter every uid can run: the system's python3 (a virtual environment under root's home is not
    reachable by the sandbox's uid), else this one."""
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable


class CodeSandbox:
    """A pool of `slots` concurrent executions under `limits` (module docstring), run by `interpreter` (default
    `system_python()`). Thread-safe."""

    def __init__(self, slots: int = 2, limits: SandboxLimits = SandboxLimits(), interpreter: str | None = None) -> None:
        self.limits = limits
        self.interpreter = interpreter or system_python()
        self.as_root = os.geteuid() == 0
        self.network_isolated = _probe_network_namespace()
        if not self.network_isolated:
            print("[areal-async] code sandbox: no network namespace here (it needs root and a kernel that allows "
                  "one): executions share the host's network", file=sys.stderr)
        if self.as_root:  # orphaned processes of an execution come back here to be reaped (prctl 36: subreaper)
            _libc().prctl(36, 1, 0, 0, 0)
        claims = [_claim_uid() for _ in range(slots)] if self.as_root else []
        self._locks = [descriptor for _, descriptor in claims]
        self.uids = tuple(uid for uid, _ in claims)  # the slots' uids (none without root)
        self._slots: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # the free ones; a call waits for one
        for uid in self.uids or [None] * slots:
            self._slots.put(uid)
        self._pool = ThreadPoolExecutor(max_workers=slots)

    def run(self, code: str, stdin: bytes = b"") -> Execution:
        """Runs `code` as a script with `stdin`; returns how it ended."""
        uid = self._slots.get()
        try:
            return self._execute(code, stdin, uid)
        finally:
            self._slots.put(uid)

    def run_many(self, jobs: list[tuple[str, bytes]]) -> list[Execution]:
        """`run` for each (code, stdin), `slots` at a time, in order."""
        return list(self._pool.map(lambda job: self.run(*job), jobs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for descriptor in self._locks:
            os.close(descriptor)
        self._locks = []

    def _execute(self, code: str, stdin: bytes, uid: int | None) -> Execution:
        with self._started(code, uid) as (process, started, end):
            captures = [_Capture(process.stdout, self.limits.output_bytes),
                        _Capture(process.stderr, self.limits.output_bytes)]
            for capture in captures:
                capture.start()
            # fed from a thread: a program that never reads a stdin larger than the pipe must still time out
            threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True).start()
            status = None
            deadline = started + self.limits.wall_s
            while process.poll() is None:
                if any(capture.exceeded.is_set() for capture in captures):
                    status = "output_limit"
                    break
                if time.perf_counter() > deadline:
                    status = "timeout"
                    break
                time.sleep(0.005)
            if status is None and any(capture.exceeded.is_set() for capture in captures):
                status = "output_limit"
            exit_code = process.returncode if status is None else None  # None: killed here
            end()
            for capture in captures:
                capture.join(timeout=1.0)
            if status is None:
                status = execution_status(exit_code)
            return Execution(status, exit_code, bytes(captures[0].data), bytes(captures[1].data),
                             time.perf_counter() - started)

    def converse(self, code: str, dialogue: Callable[[Channel], T]) -> tuple[T | None, Execution]:
        """Runs `code` and `dialogue(channel)` here, which talks to it over its stdin and stdout (`Channel`) until
        it returns; then the code is killed. Returns the dialogue's result (None when it raised ChannelClosed:
        the program ended, timed out or printed too much) and how the execution ended (stdout: the lines the
        channel skipped)."""
        uid = self._slots.get()
        try:
            with self._started(code, uid) as (process, started, end):
                stderr = _Capture(process.stderr, self.limits.output_bytes)
                stderr.start()
                channel = Channel(process, started + self.limits.wall_s, self.limits.output_bytes)
                try:
                    result = dialogue(channel)
                except ChannelClosed:
                    result = None
                exit_code = process.poll()
                end()
                stderr.join(timeout=1.0)
                status = channel.status or execution_status(exit_code)
                return result, Execution(status, exit_code, bytes(channel.skipped), bytes(stderr.data),
                                         time.perf_counter() - started)
        finally:
            self._slots.put(uid)

    @contextlib.contextmanager
    def _started(self, code: str, uid: int | None):
        """The program's process (as `main.py` in a fresh directory, deleted with what the uid left), its start
        time and the call that kills what it left (once; on leaving too)."""
        workdir = Path(tempfile.mkdtemp(prefix="areal-sandbox-"))
        try:
            (workdir / "main.py").write_text(code, encoding="utf-8")
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chown(workdir / "main.py", uid, uid)
            started = time.perf_counter()
            process = subprocess.Popen(
                [self.interpreter, "-I", "-B", "main.py"], cwd=workdir, env={}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=lambda: _child_setup(self.limits, uid, self.network_isolated),
            )
            ended = False

            def end() -> None:
                nonlocal ended
                if not ended:
                    ended = True
                    self._end(process, uid)

            try:
                yield process, started, end
            finally:
                end()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if uid is not None:
                _remove_files_of(uid)

    @staticmethod
    def _end(process: subprocess.Popen, uid: int | None) -> None:
        """Kills what the execution left: its session, then (as root) every process of its uid."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            _kill_uid(uid)
        process.wait()


class ChannelClosed(Exception):
    """The program's side of a Channel is gone: it exited, timed out or printed more than its limit."""


class Channel:
    """Line messages with a program run by `CodeSandbox.converse`: `send` writes a line to its stdin, `receive`
    returns the next stdout line that starts with `MESSAGE_MARKER` (without it); other lines are kept in
    `skipped`. Both raise ChannelClosed once the program ended, the wall-clock deadline passed (status
    "timeout") or its stdout passed `output_bytes` (status "output_limit")."""

    def __init__(self, process: subprocess.Popen, deadline: float, output_bytes: int) -> None:
        self.process, self.deadline, self.output_bytes = process, deadline, output_bytes
        self.status: str | None = None
        self.skipped = bytearray()
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._received = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._received += len(line)
            if self._received > self.output_bytes:
                break
            self._lines.put(line)
        self._lines.put(None)

    def send(self, text: str) -> None:
        if self.status is not None:
            raise ChannelClosed(self.status)
        # from a thread: a program that never reads must still meet the deadline in receive
        threading.Thread(target=_write_line, args=(self.process.stdin, (text + "\n").encode()), daemon=True).start()

    def receive(self) -> str:
        while self.status is None:
            remaining = self.deadline - time.perf_counter()
            if remaining <= 0:
                self.status = "timeout"
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.status = "output_limit" if self._received > self.output_bytes else "closed"
                break
            text = line.decode("utf-8", errors="replace")
            if text.startswith(MESSAGE_MARKER):
                return text[len(MESSAGE_MARKER):].rstrip("\n")
            self.skipped += line[: max(0, self.output_bytes - len(self.skipped))]
        raise ChannelClosed(self.status)


MESSAGE_MARKER = "\x1eareal-message "  # starts the program's reply lines; anything else it prints is skipped


def _write_line(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.flush()
    except (OSError, ValueError):
        pass
