"""A small process pool that runs untrusted answer verification with a hard timeout and memory cap.

Each worker is one process holding one end of a socket pair; it caps its own address space (``RLIMIT_AS``),
checks that it can still verify a trivial equivalence under that cap, reports ready, then answers
``(task_id, kind, payload)`` messages with ``(task_id, value, failure)``. The parent waits on every socket until
the earliest deadline. A worker that overruns its task's deadline is SIGKILLed, a worker that dies (segfault,
``os._exit``) is noticed by its socket closing; either is replaced at once and its task's verdict is a failure
("timeout", "worker_died"), which scores incorrect but is counted apart from incorrect answers.

Workers are forked by a clean server process (``areal_async.reward.worker_server``, a fresh interpreter that
imports only the verifier), never by the caller: they never import the caller's main module or inherit its
torch or CUDA state, the cap applies to a small clean process, and a replacement costs a fork (milliseconds).
A worker that cannot verify the trivial check under its cap is an error naming the cap, not a silent verdict.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NamedTuple

from areal_async.config import Conventions
from areal_async.reward.equivalence import _equivalent_unsandboxed, judge
from areal_async.reward.extraction import extract_answer

WORKER_START_TIMEOUT_S = 60.0
_MAX_CONSECUTIVE_START_FAILURES = 3
_MAX_SEND_ATTEMPTS = 2
_STOP_GRACE_S = 1.0
_READY = "ready"
# What every worker must verify under its memory cap before it takes tasks (a cap too small for sympy would
# otherwise turn every equivalent answer into "incorrect").
_START_CHECK = ("x^2+2x+1", "(x+1)^2")
# ...and the fresh allocation it must then make: the check alone may run in memory the fork inherited, so a cap
# below what the process already maps would pass it or not depending on the allocator's free space
_START_HEADROOM_BYTES = 8 << 20

Task = tuple[str, object]  # (kind, payload)


class Verdict(NamedTuple):
    """A task's result: `value` (False whenever the task failed) and why no verdict could be computed, if so:
    "timeout", "out_of_memory", "worker_died", "recursion", "error:<exception type>", or "unparsed" (an answer
    or gold the parser could not read, so the answer is not known to be wrong); None for a computed verdict.
    `credit`: the share of the answer that is right, for verifiers that give partial credit (else None)."""

    value: bool
    failure: str | None = None
    credit: float | None = None  # partial credit in [0, 1] (code: the tests passed), where the verifier gives it

    def reward(self, correct: float, incorrect: float) -> float:
        """`correct` or `incorrect` by the value, or between them by the credit when there is one."""
        if self.credit is not None:
            return incorrect + (correct - incorrect) * self.credit
        return correct if self.value else incorrect

    @property
    def scored(self) -> bool:
        """The answer was judged: right, wrong, or unreadable ("unparsed" counts as wrong). False when judging it
        failed (a timeout, memory, a dead worker, an error): its reward is unknown and it is not trained on."""
        return self.failure is None or self.failure == "unparsed"


class SandboxError(RuntimeError):
    """The pool cannot run tasks: it is closed, or its workers fail to start or to verify under their cap."""


# ---------------------------------------------------------------------------
# Worker side (in processes forked by areal_async.reward.worker_server)
# ---------------------------------------------------------------------------


def _score_response(payload: tuple[str, list[str], str, dict]) -> "Verdict":
    """Whether the answer extracted from the response equals any gold answer (under the conventions given as
    a dict of Conventions' fields); an unequal answer that met text the parser could not read is "unparsed"."""
    response, gold_answers, extract_mode, conventions = payload
    answer = extract_answer(response, extract_mode)
    if answer is None:
        return Verdict(False)
    conventions = Conventions(**conventions)
    unparsed = False
    for gold in gold_answers:
        equal, met_unparsed = judge(answer, gold, conventions)
        if equal:
            return Verdict(True)
        unparsed = unparsed or met_unparsed
    return Verdict(False, "unparsed" if unparsed else None)


def _equivalent_pair(payload: tuple[str, str, dict]) -> bool:
    prediction, gold, conventions = payload
    return _equivalent_unsandboxed(prediction, gold, Conventions(**conventions))


def _debug_hang(payload: object) -> bool:
    """Test hook: a task that never finishes."""
    while True:
        time.sleep(1.0)


def _debug_crash(payload: object) -> bool:
    """Test hook: a worker that dies mid-task without answering."""
    os._exit(70)


def _debug_allocate(payload: int) -> bool:
    """Test hook: a task that allocates `payload` MB."""
    return len(bytearray(payload * 1024 * 1024)) > 0


_TASKS: dict[str, Callable[[object], bool]] = {
    "score": _score_response,
    "equivalent": _equivalent_pair,
    "_debug_hang": _debug_hang,
    "_debug_crash": _debug_crash,
    "_debug_allocate": _debug_allocate,
}


def _failure_kind(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return "out_of_memory"
    if isinstance(error, RecursionError):
        return "recursion"
    return f"error:{type(error).__name__}"


def _limit_resources(memory_limit_mb: int) -> None:
    """Cap the address space (allocations beyond it raise MemoryError) and disable core dumps."""
    limit = memory_limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def worker_main(connection: Connection, memory_limit_mb: int) -> None:
    """Cap this process, check that it can still verify, then serve tasks until the parent sends None or goes
    away."""
    _limit_resources(memory_limit_mb)
    try:
        started = _equivalent_unsandboxed(*_START_CHECK)
        problem = None if started else f"judged {_START_CHECK[0]} and {_START_CHECK[1]} unequal"
        bytearray(_START_HEADROOM_BYTES)  # MemoryError when the cap leaves no room for a fresh mapping
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        problem = f"{type(error).__name__}: {error}"
    connection.send(_READY if problem is None else ("failed", problem))
    if problem is not None:
        return
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, kind, payload = message
        try:
            result = _TASKS[kind](payload)
            verdict = tuple(result) if isinstance(result, Verdict) else (bool(result), None)
        except Exception as error:  # MemoryError, RecursionError, anything: no verdict, and the reason
            verdict = (False, _failure_kind(error))
        connection.send((task_id, *verdict))


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _WorkerServer:
    """The clean process that forks the workers (see areal_async.reward.worker_server)."""

    def __init__(self, memory_limit_mb: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parents[2])  # the same areal_async as the caller's
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "areal_async.reward.worker_server", str(theirs.fileno()), str(memory_limit_mb)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
        )
        theirs.close()
        self.control = ours
        self.lock = threading.Lock()

    def fork_worker(self) -> tuple[int, Connection]:
        """A new worker's pid and the parent's end of its socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self.lock:
                socket.send_fds(self.control, [b"w"], [theirs.fileno()])
                reply = _receive_exactly(self.control, 8)
        except OSError as error:
            ours.close()
            raise SandboxError(f"the reward worker server is gone ({error})") from error
        finally:
            theirs.close()
        if len(reply) != 8:
            ours.close()
            raise SandboxError(f"the reward worker server exited (status {self.process.poll()})")
        return int.from_bytes(reply, "little"), Connection(ours.detach())

    def close(self) -> None:
        self.control.close()  # the server exits on EOF
        try:
            self.process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class _Worker:
    """One worker process, its socket, and the task it is running (if any)."""

    pid: int
    connection: Connection
    started_at: float
    ready: bool = False
    task_index: int | None = None
    task_id: int | None = None
    deadline: float = math.inf

    @property
    def next_deadline(self) -> float:
        """When the parent must act on this worker if nothing arrives from it."""
        if self.task_index is not None:
            return self.deadline
        return math.inf if self.ready else self.started_at + WORKER_START_TIMEOUT_S


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_worker(worker: _Worker, kill: bool) -> None:
    """Kill a worker (or let it exit on its own: its socket closes) and close its socket."""
    if kill:
        _kill(worker.pid)
    worker.connection.close()


def _stop_all(workers: list[_Worker], server: _WorkerServer) -> None:
    """Ask every worker to exit (killing the busy ones), then stop the server."""
    for worker in workers:
        try:
            worker.connection.send(None)
        except (OSError, ValueError):
            pass
    for worker in workers:
        _stop_worker(worker, kill=worker.task_index is not None or not worker.ready)
    workers.clear()
    server.close()


class SandboxPool:
    """A fixed number of sandboxed workers running tasks with a per-task wall-clock timeout.

    Construction waits until every worker has passed its start-up check under the memory cap, so a cap too
    small to verify anything fails here with the cause. :meth:`run` is thread-safe; concurrent calls are
    served one after another.
    """

    def __init__(self, num_workers: int, timeout_s: float, memory_limit_mb: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._timeout_s = timeout_s
        self._memory_limit_mb = memory_limit_mb
        self._lock = threading.Lock()
        self._closed = False
        self._last_task_id = 0
        self._start_failures = 0
        self._server = _WorkerServer(memory_limit_mb)
        self._workers: list[_Worker] = []
        # Stops the workers and their server when the pool is garbage collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_all, self._workers, self._server)
        try:
            self._workers.extend(self._start_worker() for _ in range(num_workers))
            with self._lock:
                self._wait_until_ready()
        except BaseException:
            self._finalizer()
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    def run(self, tasks: list[Task]) -> list[Verdict]:
        """Run ``(kind, payload)`` tasks in parallel, in input order; a task that raises, crashes or times out
        gets value False and its failure."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            return self._run_locked(tasks)

    def close(self) -> None:
        """Stop all workers and their server (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def _start_worker(self) -> _Worker:
        try:
            pid, connection = self._server.fork_worker()
        except SandboxError:  # the server died (killed from outside): one fresh server, then give up
            self._server.close()
            self._server = _WorkerServer(self._memory_limit_mb)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _stop_all, self._workers, self._server)
            pid, connection = self._server.fork_worker()
        return _Worker(pid, connection, started_at=time.monotonic())

    def _replace_worker(self, slot: int) -> None:
        """Kill the worker in ``slot`` and start a fresh one; give up after repeated start failures."""
        worker = self._workers[slot]
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures > _MAX_CONSECUTIVE_START_FAILURES:
                raise SandboxError(f"{self._start_failures} reward workers in a row failed to start")
        _stop_worker(worker, kill=True)
        self._workers[slot] = self._start_worker()

    def _wait_until_ready(self) -> None:
        while not all(worker.ready for worker in self._workers):
            self._wait_for_activity()
            now = time.monotonic()
            for slot in range(len(self._workers)):
                self._collect(slot, None, now)

    def _run_locked(self, tasks: list[Task]) -> list[Verdict]:
        for slot, worker in enumerate(self._workers):
            if worker.task_index is not None:  # left busy by an interrupted run
                self._replace_worker(slot)
        results = [Verdict(False, "not_run")] * len(tasks)
        pending = deque(range(len(tasks)))
        send_attempts = [0] * len(tasks)
        while pending or any(worker.task_index is not None for worker in self._workers):
            for slot, worker in enumerate(self._workers):
                if pending and worker.ready and worker.task_index is None:
                    index = pending.popleft()
                    if not self._send(worker, index, tasks[index]):
                        send_attempts[index] += 1
                        if send_attempts[index] < _MAX_SEND_ATTEMPTS:
                            pending.appendleft(index)
                        else:
                            results[index] = Verdict(False, "worker_died")
                        self._replace_worker(slot)
            self._wait_for_activity()
            now = time.monotonic()
            for slot in range(len(self._workers)):
                self._collect(slot, results, now)
        return results

    def _send(self, worker: _Worker, index: int, task: Task) -> bool:
        """Hand task ``index`` to an idle worker; False if its socket is broken."""
        kind, payload = task
        self._last_task_id += 1
        try:
            worker.connection.send((self._last_task_id, kind, payload))
        except (OSError, ValueError):
            return False
        worker.task_index, worker.task_id = index, self._last_task_id
        worker.deadline = time.monotonic() + self._timeout_s
        return True

    def _wait_for_activity(self) -> None:
        """Block until a worker writes or dies (its socket closes), or until the earliest deadline passes."""
        earliest = min(worker.next_deadline for worker in self._workers)
        wait([worker.connection for worker in self._workers],
             timeout=None if earliest == math.inf else max(0.0, earliest - time.monotonic()))

    def _collect(self, slot: int, results: list[Verdict] | None, now: float) -> None:
        """Take one message from the worker in ``slot``, or replace it if it died or overran."""
        worker = self._workers[slot]
        if worker.connection.poll():
            try:
                message = worker.connection.recv()
            except (EOFError, OSError):
                self._fail_task(worker, results, "worker_died")
                self._replace_worker(slot)
                return
            if message == _READY:
                worker.ready = True
                self._start_failures = 0
            elif message[0] == "failed":
                raise SandboxError(
                    f"a reward worker cannot verify {_START_CHECK[0]} = {_START_CHECK[1]} under its memory cap "
                    f"of {self._memory_limit_mb} MB (memory_limit_mb; reward.memory_limit_mb in a run's config): "
                    f"{message[1]}. Raise the cap."
                )
            elif message[0] == worker.task_id and results is not None:
                results[worker.task_index] = Verdict(message[1], message[2])
                worker.task_index = worker.task_id = None
        elif now >= worker.next_deadline:
            self._fail_task(worker, results, "timeout")
            self._replace_worker(slot)

    @staticmethod
    def _fail_task(worker: _Worker, results: list[Verdict] | None, failure: str) -> None:
        if worker.task_index is not None and results is not None:
            results[worker.task_index] = Verdict(False, failure)
