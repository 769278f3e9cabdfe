"""Conservation bookkeeping for prompt groups (DESIGN.md invariant 2)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DROP_REASONS = ("stale", "zero_variance", "generation_error", "shutdown")


@dataclass
class Ledger:
    """Counts groups: produced (admitted) = consumed + dropped + queued + in_flight at every instant."""

    produced: int = 0
    consumed: int = 0
    queued: int = 0
    in_flight: int = 0
    dropped: Counter = field(default_factory=Counter)

    def admit(self, groups: int = 1) -> None:
        self.produced += groups
        self.in_flight += groups

    def finish_generation(self, groups: int = 1) -> None:
        self._take("in_flight", groups)
        self.queued += groups

    def consume(self, groups: int = 1) -> None:
        self._take("queued", groups)
        self.consumed += groups

    def drop(self, reason: str, groups: int = 1, source: str = "queued") -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; expected one of {DROP_REASONS}")
        self._take(source, groups)
        self.dropped[reason] += groups

    def _take(self, state: str, groups: int) -> None:
        if getattr(self, state) < groups:
            raise RuntimeError(f"ledger: cannot move {groups} groups out of {state} ({getattr(self, state)} there)")
        setattr(self, state, getattr(self, state) - groups)

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
