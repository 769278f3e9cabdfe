"""The engine's host-side scheduling, in pure Python: which requests wait, which slot holds which request, when
to refill free slots, which slots a status snapshot shows finished, and which sequences to move so that decode
steps run on a smaller batch. The engine (actors/engine.py) asks and does the device work; this is tested
without a model.

Steps and epochs: a call counts its decode steps (each records the weight version that ran it) and its status
snapshots (epochs). A request placed in a slot after a snapshot was queued is not judged by that snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def padded_chunks(lengths: Sequence[int], budget: int) -> list[tuple[int, int, int]]:
    """Consecutive runs of `lengths` as (start, end, longest) whose padded size (count x longest) stays within
    `budget` tokens; an item longer than the budget gets a run of its own."""
    chunks, start = [], 0
    while start < len(lengths):
        longest, end = 0, start
        while end < len(lengths):
            longest_with = max(longest, lengths[end])
            if end > start and longest_with * (end - start + 1) > budget:
                break
            longest, end = longest_with, end + 1
        chunks.append((start, end, longest))
        start = end
    return chunks


def slot_bucket(highest_slot: int, slots: int) -> int:
    """The batch a decode step runs when `highest_slot` is the highest occupied slot: the smallest power of two
    above it, at least 2 (a batch of one would be a special case for the compiler), capped at `slots`."""
    return min(max(2, 1 << highest_slot.bit_length()), slots)


@dataclass
class SlotRequest:
    """A request occupying a slot."""

    index: int  # position in the generate call's prompt list
    prompt_len: int
    limit: int  # max new tokens of this request
    first_version: int  # the version that sampled its first token (in prefill)
    first_step: int  # index of the first decode step after its prefill
    placed: int  # snapshots queued before it took its slot (those do not describe it)

    def length_bound(self, steps: int) -> int:
        """An upper bound of the tokens in its cache after `steps` decode steps of the call."""
        return self.prompt_len + min(steps - self.first_step, self.limit - 1)

    def steps_left(self, steps: int) -> int:
        """Decode steps until it reaches its token limit (it may stop sooner on a stop token)."""
        return self.limit - 1 - (steps - self.first_step)


class Schedule:
    """The slots and requests of one generate call: `prompt_lengths` and `limits` (max new tokens) per request,
    `slots` slots. Requests are admitted in order into the lowest free slots."""

    def __init__(self, prompt_lengths: Sequence[int], limits: Sequence[int], slots: int) -> None:
        self.prompt_lengths, self.limits, self.slots = list(prompt_lengths), list(limits), slots
        self.pending = list(range(len(self.prompt_lengths) - 1, -1, -1))  # a stack: the next request at the end
        self.free = list(range(slots))  # sorted: the lowest free slots fill first
        self.occupants: dict[int, SlotRequest] = {}  # slot -> request
        self.step_versions: list[int] = []  # the version of each decode step queued so far
        self.epoch = 0  # snapshots queued so far

    @property
    def steps(self) -> int:
        return len(self.step_versions)

    @property
    def running(self) -> bool:
        return bool(self.pending or self.occupants)

    def wants_refill(self, refill_min: int) -> bool:
        """Requests wait and either nothing runs or at least `refill_min` slots (fewer if fewer wait) are free."""
        return bool(self.pending) and (not self.occupants or len(self.free) >= min(refill_min, len(self.pending)))

    def admit(self) -> tuple[list[int], list[int]]:
        """The next waiting requests, as many as there are free slots, and the lowest free slots they take:
        (request indices, slots). `place` them once their prefill is queued."""
        count = min(len(self.free), len(self.pending))
        requests = [self.pending.pop() for _ in range(count)]
        slots, self.free = self.free[:count], self.free[count:]
        return requests, slots

    def place(self, requests: Sequence[int], slots: Sequence[int], version: int) -> None:
        """`requests` now occupy `slots`, their first token sampled with `version` before the next step."""
        for index, slot in zip(requests, slots):
            self.occupants[slot] = SlotRequest(index, self.prompt_lengths[index], self.limits[index], version,
                                               self.steps, self.epoch)

    def steps_to_run(self, sync_every: int) -> int:
        """Decode steps before the next snapshot: `sync_every`, fewer when every occupant reaches its limit
        sooner (0 with no occupant)."""
        remaining = [request.steps_left(self.steps) for request in self.occupants.values()]
        return max(0, min(sync_every, max(remaining, default=0)))

    def record_step(self, version: int) -> None:
        self.step_versions.append(version)

    def longest_bound(self) -> int:
        """An upper bound of the tokens in any occupied slot's cache after the steps queued so far."""
        return max(request.length_bound(self.steps) for request in self.occupants.values())

    def snapshot(self) -> int:
        """A status snapshot is queued: returns its epoch."""
        self.epoch += 1
        return self.epoch

    def finished(self, epoch: int, status: Sequence[int]) -> list[tuple[int, SlotRequest, int]]:
        """The slots snapshot `epoch` shows finished (status[slot] >= 0: its token count; -1: running), as
        (slot, request, tokens); they leave the schedule and their slots are free again."""
        done = [(slot, request, int(status[slot])) for slot, request in sorted(self.occupants.items())
                if request.placed < epoch and status[slot] >= 0]
        for slot, _, _ in done:
            del self.occupants[slot]
        self.free = sorted(self.free + [slot for slot, _, _ in done])
        return done

    def versions(self, request: SlotRequest, tokens: int) -> list[int]:
        """The version that sampled each of a finished request's `tokens` tokens."""
        first = request.first_step
        return [request.first_version] + self.step_versions[first : first + tokens - 1]

    def compaction(self) -> list[tuple[int, int]]:
        """With no request waiting: moves (source slot, free destination slot) that take every sequence below
        the slot bucket its count needs, so decode steps run on a smaller batch; none if that is not possible
        or not needed."""
        if self.pending or not self.occupants:
            return []
        target = slot_bucket(len(self.occupants) - 1, self.slots)
        movers = sorted(slot for slot in self.occupants if slot >= target)
        holes = [slot for slot in self.free if slot < target][: len(movers)]
        if not movers or len(holes) < len(movers):
            return []
        return list(zip(movers, holes))

    def move(self, moves: Sequence[tuple[int, int]]) -> None:
        """Applies `compaction`'s moves; snapshots queued before them describe the old slots."""
        for source, destination in moves:
            request = self.occupants.pop(source)
            request.placed = self.epoch
            self.occupants[destination] = request
        sources, destinations = {s for s, _ in moves}, {d for _, d in moves}
        self.free = sorted(set(self.free) - destinations | sources)
