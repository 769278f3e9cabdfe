"""Conservation bookkeeping for prompt groups (DESIGN.md invariant 2).

Counts live with their owners: the controller knows how many groups it admitted (produced) and how many
workers have delivered; each queue shard knows what it received and what became of it. `Ledger.combine`
adds them up, and `balanced` checks produced = consumed + dropped + queued + in_flight, which holds only
if every delivered group was received by exactly one shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

DROP_REASONS = ("stale", "zero_variance", "bad_frame", "generation_error", "shutdown")


def check_reason(reason: str) -> None:
    if reason not in DROP_REASONS:
        raise ValueError(f"unknown drop reason {reason!r}; expected one of {DROP_REASONS}")


@dataclass
class ShardCounts:
    """What one queue shard received: each received group is queued, consumed or dropped (by reason)."""

    received: int = 0
    queued: int = 0
    consumed: int = 0
    dropped: Counter = field(default_factory=Counter)

    def state_dict(self) -> dict:
        return {"received": self.received, "queued": self.queued, "consumed": self.consumed,
                "dropped": dict(self.dropped)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ShardCounts":
        return cls(state["received"], state["queued"], state["consumed"], Counter(state["dropped"]))

    def receive(self, outcome: str) -> None:
        """A delivered group arrived: `outcome` is "queued" or a drop reason."""
        if outcome != "queued":
            check_reason(outcome)
        self.received += 1
        if outcome == "queued":
            self.queued += 1
        else:
            self.dropped[outcome] += 1

    def consume(self, groups: int = 1) -> None:
        self._take_queued(groups)
        self.consumed += groups

    def drop_queued(self, reason: str, groups: int = 1) -> None:
        check_reason(reason)
        self._take_queued(groups)
        self.dropped[reason] += groups

    def _take_queued(self, groups: int) -> None:
        if self.queued < groups:
            raise RuntimeError(f"ledger: cannot take {groups} groups out of the queue ({self.queued} queued)")
        self.queued -= groups


@dataclass
class Ledger:
    """The whole system's group counts at one instant."""

    produced: int = 0
    consumed: int = 0
    queued: int = 0
    in_flight: int = 0
    dropped: Counter = field(default_factory=Counter)

    @classmethod
    def combine(
        cls, produced: int, in_flight: int, shards: Iterable[ShardCounts], controller_dropped: Counter | None = None
    ) -> "Ledger":
        """Adds the shards' counts to the controller's (which drops groups whose generation keeps failing)."""
        ledger = cls(produced=produced, in_flight=in_flight, dropped=Counter(controller_dropped or {}))
        for shard in shards:
            ledger.consumed += shard.consumed
            ledger.queued += shard.queued
            ledger.dropped.update(shard.dropped)
        return ledger

    @property
    def balanced(self) -> bool:
        return self.produced == self.consumed + sum(self.dropped.values()) + self.queued + self.in_flight

    def totals(self) -> dict:
        return {
            "produced": self.produced,
            "consumed": self.consumed,
            "dropped": {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS},
            "queued": self.queued,
            "in_flight": self.in_flight,
        }
