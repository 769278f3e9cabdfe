"""The rollout controller: walks the prompt set epoch by epoch and admits groups under the staleness rule."""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np

from areal_async.data.records import PromptRecord
from areal_async.actor_system.staleness import may_admit
from areal_async.types import PromptGroup


class RolloutController:
    """Admits prompt groups in a seeded order under the staleness rule.

    Admission slots are counted as groups admitted minus groups dropped after generation (stale, zero
    variance, bad frame): a dropped group frees its slot, so the learner still receives groups_per_step
    trainable groups per step. A group whose generation failed is handed out again (counted in
    `readmitted`), keeping its place in the ledger. `cursor` counts the groups admitted, `position` walks the
    data order (they differ by the prompts skipped).

    success_rate_range (lo, hi): a prompt whose last group solved a fraction of its answers outside [lo, hi]
    (`delivered(..., solved=)`) is skipped when the data order comes to it again (`skipped` counts them): the
    policy always or never solves it, so its group would teach nothing. After a whole pass of skipped prompts
    the next is admitted anyway.

    max_oversample: a group in flight takes `1 / oversample` of an admission slot, `oversample` being the inverse
    of the recent fraction of groups kept on arrival (`keep_rate`, a moving average over about one step of
    deliveries), at most max_oversample. When zero-variance filtering drops most groups, one round then admits
    enough to fill the step. 1: every group in flight takes a whole slot.
    """

    def __init__(
        self,
        records: Sequence[PromptRecord],
        encode: Callable[[str], list[int]],
        group_size: int,
        groups_per_step: int,
        max_staleness: int | None,
        seed: int,
        success_rate_range: tuple[float, float] | None = None,
        max_oversample: float = 1.0,
    ) -> None:
        if not records:
            raise ValueError("the prompt set is empty")
        self.records = list(records)
        self.encode = encode
        self.group_size = group_size
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.seed = seed
        self.success_rate_range = success_rate_range
        self.max_oversample = max_oversample
        self.keep_rate = 1.0  # moving average of the groups kept on arrival (1) or dropped (0)
        self.success_rates: dict[str, float] = {}  # query id -> the fraction its last group solved
        self.skipped = 0
        self.position = 0
        self.cursor = 0
        self.delivered_groups = 0
        self.dropped: Counter = Counter()  # groups given up on here (generation kept failing)
        self.freed_slots = 0
        self.readmitted = 0
        self._retry: deque[PromptGroup] = deque()
        self._in_flight: dict[str, PromptGroup] = {}  # admitted, not yet delivered nor given up
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _record_at(self, position: int) -> PromptRecord:
        epoch, offset = divmod(position, len(self.records))
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self.records[self._epoch_order[1][offset]]

    def _next_record(self) -> PromptRecord:
        """The next prompt of the data order that success_rate_range lets through."""
        for _ in range(len(self.records)):
            record = self._record_at(self.position)
            self.position += 1
            rate = self.success_rates.get(record.query_id)
            if self.success_rate_range is None or rate is None or \
                    self.success_rate_range[0] <= rate <= self.success_rate_range[1]:
                return record
            self.skipped += 1
        return record  # a whole pass skipped: this one goes anyway

    @property
    def occupied_slots(self) -> int:
        return self.cursor - self.freed_slots

    @property
    def oversample(self) -> float:
        """Groups admitted per group expected to be kept: 1 / keep_rate, at most max_oversample."""
        return min(self.max_oversample, 1.0 / max(self.keep_rate, 1e-9))

    def admit(self, current_version: int) -> PromptGroup | None:
        """The next group (a failed one first), or None while the staleness rule forbids a new one."""
        if self._retry:
            return replace(self._retry.popleft(), admitted_at_version=current_version)
        if not may_admit(self.occupied_slots, current_version, self.max_staleness, self.groups_per_step,
                         in_flight=self.in_flight, keep_rate=1.0 / self.oversample):
            return None
        record = self._next_record()
        group = PromptGroup(
            group_id=f"g{self.cursor}",
            query_id=record.query_id,
            prompt=record.prompt,
            prompt_tokens=np.asarray(self.encode(record.prompt), dtype=np.int32),
            solutions=record.solutions,
            group_size=self.group_size,
            admitted_at_version=current_version,
        )
        self.cursor += 1
        self._in_flight[group.group_id] = group
        return group

    @property
    def produced(self) -> int:
        return self.cursor

    @property
    def in_flight(self) -> int:
        return self.cursor - self.delivered_groups - sum(self.dropped.values())

    def in_flight_groups(self) -> list[PromptGroup]:
        """The groups admitted and neither delivered nor given up (those waiting to be handed out again too)."""
        return list(self._in_flight.values())

    def delivered(self, group_id: str, dropped: bool = False, solved: float | None = None) -> None:
        """A worker handed a finished group to the queue; `dropped`: the queue dropped it on arrival, which
        frees its admission slot in the same call (a checkpoint never sees the one without the other);
        `solved`: the fraction of its scored answers that were correct (None: none was scored)."""
        group = self._in_flight.pop(group_id)
        if solved is not None:
            self.success_rates[group.query_id] = solved
        self.delivered_groups += 1
        self.freed_slots += int(dropped)
        self.keep_rate += (float(not dropped) - self.keep_rate) / self.groups_per_step

    def readmit(self, group: PromptGroup) -> None:
        """Generation of `group` failed: it stays in flight and is handed out again."""
        self.readmitted += 1
        self._retry.append(group)

    def give_up(self, group: PromptGroup) -> None:
        """Generation of `group` failed too often: it is dropped and frees its admission slot."""
        del self._in_flight[group.group_id]
        self.dropped["generation_error"] += 1
        self.freed_slots += 1

    def free_slots(self, groups: int) -> None:
        """Groups the queue dropped as stale when the learner took a batch give their admission slots back."""
        self.freed_slots += groups

    def state_dict(self) -> dict:
        """Everything needed to continue the data order and the counts after a restart."""
        return {
            "cursor": self.cursor,
            "position": self.position,
            "skipped": self.skipped,
            "success_rates": dict(self.success_rates),
            "delivered_groups": self.delivered_groups,
            "freed_slots": self.freed_slots,
            "readmitted": self.readmitted,
            "dropped": dict(self.dropped),
            "keep_rate": self.keep_rate,
            "in_flight": [group_to_dict(group) for group in self._in_flight.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a checkpoint. Groups that were in flight then are handed out again first (their
        generation was lost with the crash), so no admitted prompt is skipped."""
        self.cursor = state["cursor"]
        self.position = state.get("position", self.cursor)  # run checkpoints from before the filter: no skips
        self.skipped = state.get("skipped", 0)
        self.success_rates = dict(state.get("success_rates", {}))
        self.delivered_groups = state["delivered_groups"]
        self.freed_slots = state["freed_slots"]
        self.readmitted = state["readmitted"]
        self.dropped = Counter(state["dropped"])
        self.keep_rate = state.get("keep_rate", 1.0)  # checkpoints from before oversampling: none yet
        groups = [group_from_dict(entry) for entry in state["in_flight"]]
        self._in_flight = {group.group_id: group for group in groups}
        self._retry = deque(groups)


def settle_deliveries(state: dict, receipts: dict[str, str]) -> dict:
    """A controller `state_dict` with the groups in `receipts` (group id -> the queue's outcome: "queued" or a
    drop reason) counted as delivered, as the worker's receipt would have done; a dropped one also frees its
    slot. Used when the queue's snapshot, taken after the controller's, already holds groups that the
    controller still counted as in flight."""
    in_flight = [entry for entry in state["in_flight"] if entry["group_id"] not in receipts]
    settled = len(state["in_flight"]) - len(in_flight)
    if settled != len(receipts):
        raise ValueError(f"{len(receipts) - settled} receipts name groups that the controller does not hold in flight")
    return {
        **state,
        "in_flight": in_flight,
        "delivered_groups": state["delivered_groups"] + settled,
        "freed_slots": state["freed_slots"] + sum(outcome != "queued" for outcome in receipts.values()),
    }


def group_to_dict(group: PromptGroup) -> dict:
    return {**asdict(group), "prompt_tokens": [int(t) for t in group.prompt_tokens], "solutions": list(group.solutions)}


def group_from_dict(entry: dict) -> PromptGroup:
    return PromptGroup(**{**entry, "prompt_tokens": np.asarray(entry["prompt_tokens"], dtype=np.int32),
                          "solutions": tuple(entry["solutions"])})
