"""A small process pool that runs untrusted answer verification with a hard timeout and memory cap.

Each worker is one process holding one end of a duplex pipe; it caps its own address space
(``RLIMIT_AS``), reports ready, then answers ``(task_id, kind, payload)`` messages with
``(task_id, result)``. The parent waits on every pipe and process sentinel until the earliest
deadline. A worker that overruns its task's deadline is SIGKILLed, a worker that dies (segfault,
MemoryError, ``os._exit``) is reaped; either is replaced at once and its task scores False.

Workers start through ``forkserver`` with this module preloaded, so a replacement is a fork of a
clean server that already imported sympy (milliseconds, not a fresh interpreter); ``spawn`` is the
fallback. Never ``fork``: the parent may hold torch or CUDA threads.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

from areal_async.reward.equivalence import _equivalent_unsandboxed
from areal_async.reward.extraction import extract_answer

WORKER_START_TIMEOUT_S = 60.0
_MAX_CONSECUTIVE_START_FAILURES = 3
_MAX_SEND_ATTEMPTS = 2
_STOP_GRACE_S = 1.0
_READY = "ready"

Task = tuple[str, object]  # (kind, payload)


class SandboxError(RuntimeError):
    """The pool cannot run tasks: it is closed, or its workers fail to start."""


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def _score_response(payload: tuple[str, list[str], str]) -> bool:
    """Whether the answer extracted from the response equals any gold answer."""
    response, gold_answers, extract_mode = payload
    answer = extract_answer(response, extract_mode)
    return answer is not None and any(_equivalent_unsandboxed(answer, gold) for gold in gold_answers)


def _equivalent_pair(payload: tuple[str, str]) -> bool:
    prediction, gold = payload
    return _equivalent_unsandboxed(prediction, gold)


def _debug_hang(payload: object) -> bool:
    """Test hook: a task that never finishes."""
    while True:
        time.sleep(1.0)


def _debug_crash(payload: object) -> bool:
    """Test hook: a worker that dies mid-task without answering."""
    os._exit(70)


_TASKS: dict[str, Callable[[object], bool]] = {
    "score": _score_response,
    "equivalent": _equivalent_pair,
    "_debug_hang": _debug_hang,
    "_debug_crash": _debug_crash,
}


def _limit_resources(memory_limit_mb: int) -> None:
    """Cap the address space (allocations beyond it raise MemoryError) and disable core dumps."""
    limit = memory_limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _worker_main(connection: Connection, memory_limit_mb: int) -> None:
    """Serve tasks until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    _limit_resources(memory_limit_mb)
    connection.send(_READY)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, kind, payload = message
        try:
            result = bool(_TASKS[kind](payload))
        except Exception:  # MemoryError, RecursionError, anything: the answer is unusable
            result = False
        connection.send((task_id, result))


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


@dataclass
class _Worker:
    """One worker process, its pipe, and the task it is running (if any)."""

    process: BaseProcess
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


def _process_context() -> BaseContext:
    """forkserver (with this module preloaded) where available, else spawn; never fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])  # "__main__" is the default preload
        return context
    return multiprocessing.get_context("spawn")


def _stop_worker(worker: _Worker, kill: bool) -> None:
    """Kill (or wait briefly for) a worker, reap it so no zombie is left, and close its pipe."""
    if kill and worker.process.is_alive():
        worker.process.kill()
    worker.process.join(_STOP_GRACE_S)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.process.close()
    worker.connection.close()


def _stop_workers(workers: list[_Worker]) -> None:
    """Ask every worker to exit, then kill the ones that do not within the grace period."""
    for worker in workers:
        try:
            worker.connection.send(None)
        except (OSError, ValueError):
            pass
    for worker in workers:
        _stop_worker(worker, kill=worker.task_index is not None)
    workers.clear()


class SandboxPool:
    """A fixed number of sandboxed workers running tasks with a per-task wall-clock timeout.

    :meth:`run` is thread-safe; concurrent calls are served one after another.
    """

    def __init__(self, num_workers: int, timeout_s: float, memory_limit_mb: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._timeout_s = timeout_s
        self._memory_limit_mb = memory_limit_mb
        self._context = _process_context()
        self._lock = threading.Lock()
        self._closed = False
        self._last_task_id = 0
        self._start_failures = 0
        self._workers = [self._start_worker() for _ in range(num_workers)]
        # Stops the workers when the pool is garbage collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, tasks: list[Task]) -> list[bool]:
        """Run ``(kind, payload)`` tasks in parallel; a task that fails, crashes or times out is False."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            return self._run_locked(tasks)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, self._memory_limit_mb), name="reward-verifier", daemon=True
        )
        process.start()
        child_end.close()  # so that the parent sees EOF when the worker dies
        return _Worker(process, parent_end, started_at=time.monotonic())

    def _replace_worker(self, slot: int) -> None:
        """Kill the worker in ``slot`` and start a fresh one; give up after repeated start failures."""
        worker = self._workers[slot]
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures > _MAX_CONSECUTIVE_START_FAILURES:
                raise SandboxError(f"{self._start_failures} reward workers in a row failed to start")
        _stop_worker(worker, kill=True)
        self._workers[slot] = self._start_worker()

    def _run_locked(self, tasks: list[Task]) -> list[bool]:
        for slot, worker in enumerate(self._workers):
            if worker.task_index is not None:  # left busy by an interrupted run
                self._replace_worker(slot)
        results = [False] * len(tasks)
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
                        self._replace_worker(slot)
            self._wait_for_activity()
            now = time.monotonic()
            for slot in range(len(self._workers)):
                self._collect(slot, results, now)
        return results

    def _send(self, worker: _Worker, index: int, task: Task) -> bool:
        """Hand task ``index`` to an idle worker; False if its pipe is broken."""
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
        """Block until a worker writes or dies, or until the earliest deadline passes."""
        waitables = [worker.connection for worker in self._workers]
        waitables += [worker.process.sentinel for worker in self._workers]
        earliest = min(worker.next_deadline for worker in self._workers)
        wait(waitables, timeout=None if earliest == math.inf else max(0.0, earliest - time.monotonic()))

    def _collect(self, slot: int, results: list[bool], now: float) -> None:
        """Take one message from the worker in ``slot``, or replace it if it died or overran."""
        worker = self._workers[slot]
        if worker.connection.poll():
            try:
                message = worker.connection.recv()
            except (EOFError, OSError):
                self._replace_worker(slot)
                return
            if message == _READY:
                worker.ready = True
                self._start_failures = 0
            elif message[0] == worker.task_id:
                results[worker.task_index] = message[1]
                worker.task_index = worker.task_id = None
        elif not worker.process.is_alive() or now >= worker.next_deadline:
            self._replace_worker(slot)  # its task, if any, keeps its False result
