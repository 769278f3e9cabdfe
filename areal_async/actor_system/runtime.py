"""The services that rollout workers and the learner share: the controller service and Ray proxies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from areal_async.actor_system.controller import RolloutController
from areal_async.types import PromptGroup


KEPT_ERRORS = 100  # generation errors kept (with tracebacks) in the service's state; all are counted


class ControllerService:
    """The controller as workers see it: admission at the learner's latest version, delivery receipts,
    re-admission of failed groups, the stop flag, and generation statistics.

    Generation errors are kept with their tracebacks (the newest KEPT_ERRORS; `errors_since` hands them to the
    run, which writes every one to its folder). The same error `max_repeated_errors` times in a row, with no
    group delivered in between, is fatal: `fatal_error` returns it and the run stops with it.

    Each group in flight is held by the worker it was handed to; when a worker dies, `release_worker` settles
    its groups. `sync_epoch` numbers the weight-sync groups: the driver opens a new one when the workers
    change, and workers learn of it from `sync_state`."""

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
        self.episode_counts: Counter = Counter()  # agent episodes by end reason, and their tool calls
        self.generated_reward_sum = 0.0
        self.generated_scored = 0
        self.readmitted_by_reason: Counter = Counter()
        self.holders: dict[str, int] = {}  # group id -> the worker generating it
        self.sync_epoch = 0

    def admit_groups(self, max_groups: int, worker: int | None = None) -> list[PromptGroup]:
        groups = []
        while not self.stopped and not self.held and len(groups) < max_groups:
            group = self.controller.admit(self.version)
            if group is None:
                break
            groups.append(group)
            if worker is not None:
                self.holders[group.group_id] = worker
        return groups

    def delivered(self, group_id: str, dropped: bool = False, solved: float | None = None) -> None:
        self.controller.delivered(group_id, dropped, solved)
        self.holders.pop(group_id, None)
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
            self._retry(group, "generation_error")

    def _retry(self, group: PromptGroup, reason: str) -> None:
        """Hands `group` out again (counted by `reason`), or drops it after too many attempts."""
        self.holders.pop(group.group_id, None)
        self.failed_attempts[group.group_id] += 1
        if self.failed_attempts[group.group_id] >= self.max_generation_attempts:
            self.controller.give_up(group)
        else:
            self.controller.readmit(group)
            self.readmitted_by_reason[reason] += 1

    def held_by(self, worker: int) -> list[str]:
        return [group_id for group_id, holder in self.holders.items() if holder == worker]

    def release_worker(self, worker: int, receipts: dict[str, str]) -> dict[str, int]:
        """`worker` died: each group it held is delivered if the queue received it (`receipts`: group id ->
        the queue's outcome), else handed out again (reason "worker_died"). Returns the two counts."""
        held = [group for group in self.controller.in_flight_groups() if self.holders.get(group.group_id) == worker]
        delivered = [group for group in held if group.group_id in receipts]
        for group in delivered:
            self.delivered(group.group_id, dropped=receipts[group.group_id] != "queued")
        for group in held:
            if group.group_id not in receipts:
                self._retry(group, "worker_died")
        return {"delivered": len(delivered), "readmitted": len(held) - len(delivered)}

    def set_sync_epoch(self, epoch: int) -> None:
        self.sync_epoch = epoch

    def sync_state(self) -> tuple[int, int]:
        """(the newest published version, the weight-sync epoch): what a worker polls at token boundaries."""
        return self.version, self.sync_epoch

    def report_generation(self, tokens: int, generate_s: float, reward_s: float = 0.0,
                          reward_failures: dict[str, int] | None = None, reward_sum: float = 0.0,
                          scored: int = 0, episodes: dict[str, int] | None = None) -> None:
        """A round's generated tokens and seconds, the verifier's failures, the sum of the rewards of its
        `scored` answers (every generated group's, before the queue filters any), and its episodes' counts (by
        end reason, tool calls, malformed calls)."""
        self.generated_tokens += tokens
        self.generation_seconds += generate_s
        self.reward_seconds += reward_s
        self.reward_failures.update(reward_failures or {})
        self.episode_counts.update(episodes or {})
        self.generated_reward_sum += reward_sum
        self.generated_scored += scored

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

    def _tallies(self) -> dict:
        """The running counts that a checkpoint keeps and the stats report alike."""
        return {
            "generated_tokens": self.generated_tokens,
            "generation_seconds": self.generation_seconds,
            "reward_seconds": self.reward_seconds,
            "reward_failures": dict(self.reward_failures),
            "episode_counts": dict(self.episode_counts),
            "generated_reward_sum": self.generated_reward_sum,
            "generated_scored": self.generated_scored,
            "readmitted_by_reason": dict(self.readmitted_by_reason),
        }

    def state_dict(self) -> dict:
        return {
            "controller": self.controller.state_dict(),
            "version": self.version,
            "failed_attempts": dict(self.failed_attempts),
            "error_count": self.error_count,
            "errors": self.errors,
            **self._tallies(),
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
        self.episode_counts = Counter(state.get("episode_counts", {}))  # run checkpoints from before it: none
        self.readmitted_by_reason = Counter(state.get("readmitted_by_reason", {}))
        self.generated_reward_sum = state.get("generated_reward_sum", 0.0)  # run checkpoints from before it: 0
        self.generated_scored = state.get("generated_scored", 0)

    def counts(self) -> dict:
        return {
            "produced": self.controller.produced,
            "prompts_skipped": self.controller.skipped,
            "in_flight": self.controller.in_flight,
            "readmitted": self.controller.readmitted,
            "occupied_slots": self.controller.occupied_slots,
            "oversample": self.controller.oversample,
            "generation_errors": self.error_count,
            "controller_dropped": dict(self.controller.dropped),
            **self._tallies(),
            "version": self.version,
        }


class ActorDied(RuntimeError):
    """A Ray actor of the run died (its process is gone); the message names it."""

    @classmethod
    def of(cls, name: str, error: Exception) -> "ActorDied":
        return cls(f"{name} died ({describe_death(error)})")


def describe_death(error: Exception) -> str:
    """The first line of a Ray actor error (its message goes on for lines of advice)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class WorkerKeepsDying(RuntimeError):
    """Rollout workers died more often than cluster.max_worker_restarts within the restart window."""


class RayProxy:
    """Calls a Ray actor's methods synchronously, so code written against local objects runs unchanged. A call
    to a dead actor raises ActorDied naming it (`name`)."""

    def __init__(self, handle, name: str) -> None:
        self._handle = handle
        self._name = name

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pickling probes dunder methods before _handle is restored
            raise AttributeError(name)
        method = getattr(self._handle, name)

        def call(*args, **kwargs):
            import ray

            try:
                return ray.get(method.remote(*args, **kwargs))
            except ray.exceptions.RayActorError as error:
                raise ActorDied.of(self._name, error) from error

        return call
