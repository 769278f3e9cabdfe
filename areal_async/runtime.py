"""The services that rollout workers and the learner share: the controller service and Ray proxies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from areal_async.controller import RolloutController
from areal_async.types import PromptGroup


KEPT_ERRORS = 100  # generation errors kept (with tracebacks) in the service's state; all are counted


class ControllerService:
    """The controller as workers see it: admission at the learner's latest version, delivery receipts,
    re-admission of failed groups, the stop flag, and generation statistics.

    Generation errors are kept with their tracebacks (the newest KEPT_ERRORS; `errors_since` hands them to the
    run, which writes every one to its folder). The same error `max_repeated_errors` times in a row, with no
    group delivered in between, is fatal: `fatal_error` returns it and the run stops with it."""

    def __init__(self, controller: RolloutController, max_generation_attempts: int = 3,
                 max_repeated_errors: int = 3) -> None:
        self.controller = controller
        self.max_generation_attempts = max_generation_attempts
        self.max_repeated_errors = max_repeated_errors
        self.failed_attempts: Counter = Counter()
        self.version = 0
        self.stopped = False
        self.held = False  # admission paused while a run checkpoint is taken
        self.error_count = 0
        self.errors: list[dict] = []  # the newest KEPT_ERRORS: index, reason, traceback, groups
        self.repeated = 0  # the newest error's repetitions since the last delivery
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.reward_seconds = 0.0
        self.reward_failures: Counter = Counter()

    def admit_groups(self, max_groups: int) -> list[PromptGroup]:
        groups = []
        while not self.stopped and not self.held and len(groups) < max_groups:
            group = self.controller.admit(self.version)
            if group is None:
                break
            groups.append(group)
        return groups

    def delivered(self, group_id: str, dropped: bool = False) -> None:
        self.controller.delivered(group_id, dropped)
        self.repeated = 0

    def free_slots(self, groups: int) -> None:
        self.controller.free_slots(groups)

    def readmit(self, groups: Sequence[PromptGroup], reason: str, traceback: str = "") -> None:
        """Generation of `groups` raised `reason` (with `traceback`): each is handed out again, or dropped after
        too many attempts."""
        same = bool(self.errors) and self.errors[-1]["reason"] == reason
        self.repeated = self.repeated + 1 if same else 1
        self.errors.append({"index": self.error_count, "reason": reason, "traceback": traceback,
                            "groups": [group.group_id for group in groups], "repeated": self.repeated})
        del self.errors[:-KEPT_ERRORS]
        self.error_count += 1
        for group in groups:
            self.failed_attempts[group.group_id] += 1
            if self.failed_attempts[group.group_id] >= self.max_generation_attempts:
                self.controller.give_up(group)
            else:
                self.controller.readmit(group)

    def report_generation(self, tokens: int, generate_s: float, reward_s: float = 0.0,
                          reward_failures: dict[str, int] | None = None) -> None:
        self.generated_tokens += tokens
        self.generation_seconds += generate_s
        self.reward_seconds += reward_s
        self.reward_failures.update(reward_failures or {})

    def errors_since(self, index: int) -> list[dict]:
        """The kept generation errors numbered `index` and later."""
        return [error for error in self.errors if error["index"] >= index]

    def fatal_error(self) -> dict | None:
        """The newest error once it repeated max_repeated_errors times in a row, else None."""
        if self.errors and self.repeated >= self.max_repeated_errors:
            return self.errors[-1]
        return None

    def set_version(self, version: int) -> None:
        self.version = version

    def current_version(self) -> int:
        return self.version

    def stop(self) -> None:
        self.stopped = True

    def should_stop(self) -> bool:
        return self.stopped

    def state_dict(self) -> dict:
        return {
            "controller": self.controller.state_dict(),
            "version": self.version,
            "failed_attempts": dict(self.failed_attempts),
            "error_count": self.error_count,
            "errors": self.errors,
            "generated_tokens": self.generated_tokens,
            "generation_seconds": self.generation_seconds,
            "reward_seconds": self.reward_seconds,
            "reward_failures": dict(self.reward_failures),
        }

    def hold_and_snapshot(self) -> dict:
        """`state_dict`, after which nothing is admitted until `release`: a run checkpoint snapshots the queue
        next, and no group admitted after this snapshot may reach the queue before that."""
        self.held = True
        return self.state_dict()

    def release(self) -> None:
        self.held = False

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.version = state["version"]
        self.failed_attempts = Counter(state["failed_attempts"])
        self.error_count, self.errors = state["error_count"], list(state["errors"])
        self.generated_tokens = state["generated_tokens"]
        self.generation_seconds = state["generation_seconds"]
        self.reward_seconds = state["reward_seconds"]
        self.reward_failures = Counter(state["reward_failures"])

    def counts(self) -> dict:
        return {
            "produced": self.controller.produced,
            "in_flight": self.controller.in_flight,
            "readmitted": self.controller.readmitted,
            "occupied_slots": self.controller.occupied_slots,
            "generation_errors": self.error_count,
            "controller_dropped": dict(self.controller.dropped),
            "generated_tokens": self.generated_tokens,
            "generation_seconds": self.generation_seconds,
            "reward_seconds": self.reward_seconds,
            "reward_failures": dict(self.reward_failures),
            "version": self.version,
        }


class RayProxy:
    """Calls a Ray actor's methods synchronously, so code written against local objects runs unchanged."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pickling probes dunder methods before _handle is restored
            raise AttributeError(name)
        import ray

        method = getattr(self._handle, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))
