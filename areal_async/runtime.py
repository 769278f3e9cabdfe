"""The services that rollout workers and the learner share: the controller service and Ray proxies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from areal_async.controller import RolloutController
from areal_async.types import PromptGroup


class ControllerService:
    """The controller as workers see it: admission at the learner's latest version, delivery receipts,
    re-admission of failed groups, the stop flag, and generation statistics."""

    def __init__(self, controller: RolloutController, max_generation_attempts: int = 3) -> None:
        self.controller = controller
        self.max_generation_attempts = max_generation_attempts
        self.failed_attempts: Counter = Counter()
        self.version = 0
        self.stopped = False
        self.held = False  # admission paused while a run checkpoint is taken
        self.generation_errors: list[str] = []
        self.generated_tokens = 0
        self.generation_seconds = 0.0

    def admit_groups(self, max_groups: int) -> list[PromptGroup]:
        groups = []
        while not self.stopped and not self.held and len(groups) < max_groups:
            group = self.controller.admit(self.version)
            if group is None:
                break
            groups.append(group)
        return groups

    def delivered(self, group_id: str) -> None:
        self.controller.delivered(group_id)

    def free_slots(self, groups: int) -> None:
        self.controller.free_slots(groups)

    def readmit(self, groups: Sequence[PromptGroup], reason: str) -> None:
        """Generation of `groups` raised: each is handed out again, or dropped after too many attempts."""
        self.generation_errors.append(reason)
        for group in groups:
            self.failed_attempts[group.group_id] += 1
            if self.failed_attempts[group.group_id] >= self.max_generation_attempts:
                self.controller.give_up(group)
            else:
                self.controller.readmit(group)

    def report_generation(self, tokens: int, seconds: float) -> None:
        self.generated_tokens += tokens
        self.generation_seconds += seconds

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
            "generation_errors": self.generation_errors,
            "generated_tokens": self.generated_tokens,
            "generation_seconds": self.generation_seconds,
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
        self.generation_errors = list(state["generation_errors"])
        self.generated_tokens = state["generated_tokens"]
        self.generation_seconds = state["generation_seconds"]

    def counts(self) -> dict:
        return {
            "produced": self.controller.produced,
            "in_flight": self.controller.in_flight,
            "readmitted": self.controller.readmitted,
            "occupied_slots": self.controller.occupied_slots,
            "generation_errors": len(self.generation_errors),
            "controller_dropped": dict(self.controller.dropped),
            "generated_tokens": self.generated_tokens,
            "generation_seconds": self.generation_seconds,
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
