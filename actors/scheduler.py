"""The engine's host-side scheduling, in pure Python: which requests wait, which slot (row of the decode batch)
holds which request, which KV blocks each sequence owns, when to admit, when to preempt, which slots a status
snapshot shows finished, and which sequences to move so that decode steps run on a smaller batch. The engine
(actors/engine.py) asks and does the device work; this is tested without a model.

Blocks: the KV cache is a pool of fixed-size blocks (areal_async/model/paged_cache.py); `BlockPool` hands them
out with reference counts. A sequence's blocks cover its positions; before each run of decode steps every
occupant gets the blocks its length can reach by the end of the run (`grow`). When the pool cannot cover that,
the youngest occupants are preempted (`victims`, `preempt`): their blocks go back, and they wait again at the
head of the queue with what they generated so far, to be prefilled again (prompt + those tokens) when blocks
free up. Admission waits for free blocks, keeping free what the running sequences can grow into in one run.

Groups: consecutive waiting requests with the same prompt (the G samples of one prompt) are admitted together:
one prefill computes the prompt, every sample points at the same full prompt blocks, and only the partial last
block is copied (`Admission`).

Steps and epochs: a call counts its decode steps (each records the weight version that ran it) and its status
snapshots (epochs). A request placed in a slot after a snapshot was queued is not judged by that snapshot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from areal_async.model.decode_batch import decode_batch_size
from areal_async.model.paged_cache import blocks_for


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


class BlockPool:
    """Blocks 1 .. count - 1 of a paged cache (block 0 is the null block), reference-counted: a block shared by
    several sequences returns to the pool when the last one releases it."""

    def __init__(self, count: int) -> None:
        if count < 2:
            raise ValueError(f"a block pool needs 2 blocks or more (one is the null block), got {count}")
        self.count = count
        self._free = list(range(count - 1, 0, -1))  # a stack: the lowest ids come first
        self._refs = [0] * count
        self.peak_in_use = 0

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.count - 1 - len(self._free)

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"the block pool has {len(self._free)} free blocks, {count} asked")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def freed_by(self, holders: Sequence[Sequence[int]]) -> int:
        """How many blocks would return to the pool if every one of `holders` (lists of blocks, one per holder)
        released its blocks: those whose every reference is among them."""
        released = Counter(block for blocks in holders for block in blocks)
        return sum(1 for block, count in released.items() if count == self._refs[block])


@dataclass
class Prior:
    """What a preempted request generated before it lost its blocks: tokens, behaviour logprobs, versions."""

    tokens: list[int]
    logprobs: list[float]
    versions: list[int]


@dataclass
class SlotRequest:
    """A request occupying a slot."""

    index: int  # position in the generate call's prompt list
    prompt_len: int  # tokens prefilled at admission: the prompt, and what it generated before a preemption
    limit: int  # new tokens still allowed at admission
    first_version: int  # the version that sampled its first token after admission (in prefill)
    first_step: int  # index of the first decode step after its prefill
    placed: int  # snapshots queued before it took its slot (those do not describe it)
    order: int  # admission order: the youngest is preempted first
    blocks: list[int] = field(default_factory=list)  # its block table
    shared: int = 0  # leading blocks shared with the other samples of its prompt
    prior: Prior | None = None

    def length_bound(self, steps: int) -> int:
        """An upper bound of the tokens in its cache after `steps` decode steps of the call."""
        return self.prompt_len + min(steps - self.first_step, self.limit - 1)

    def steps_left(self, steps: int) -> int:
        """Decode steps until it reaches its token limit (it may stop sooner on a stop token)."""
        return self.limit - 1 - (steps - self.first_step)

    @property
    def generated_before(self) -> int:
        return 0 if self.prior is None else len(self.prior.tokens)


@dataclass
class Admission:
    """Requests admitted together: the samples of one prompt (or one resumed request), prefilled once.
    `prefill_len` tokens (prompt, plus what a resumed request generated) go into member 0's blocks; the other
    members point at the same `shared` full blocks and get a copy of member 0's partial block."""

    requests: list[int]
    slots: list[int]
    prefill_len: int
    shared: list[int]
    own: list[list[int]]  # per member, its blocks after the shared ones

    def table(self, member: int) -> list[int]:
        return self.shared + self.own[member]


class Schedule:
    """The slots, blocks and requests of one generate call: `prompt_lengths` and `limits` (max new tokens) per
    request, `slots` slots, blocks of `block_size` positions from `pool`. `prompt_keys`: equal keys mark
    requests with the same prompt (None: no sharing). `run_tokens`: decode steps between two block grants (the
    engine's sync_every), which sets the admission headroom. Requests are admitted in order into the lowest
    free slots."""

    def __init__(self, prompt_lengths: Sequence[int], limits: Sequence[int], slots: int, block_size: int,
                 pool: BlockPool, prompt_keys: Sequence[Hashable] | None = None, run_tokens: int = 1) -> None:
        self.prompt_lengths, self.limits, self.slots = list(prompt_lengths), list(limits), slots
        self.block_size, self.pool = block_size, pool
        # the blocks a sequence can grow into between two grants (a run of `run_tokens` decode steps)
        self.run_blocks = blocks_for(max(1, run_tokens), block_size)
        self.prompt_keys = list(prompt_keys) if prompt_keys is not None else None
        self.pending = list(range(len(self.prompt_lengths) - 1, -1, -1))  # a stack: the next request at the end
        self.resumed: dict[int, Prior] = {}  # preempted requests waiting again
        self.free = list(range(slots))  # sorted: the lowest free slots fill first
        self.occupants: dict[int, SlotRequest] = {}  # slot -> request
        self.step_versions: list[int] = []  # the version of each decode step queued so far
        self.epoch = 0  # snapshots queued so far
        self.preemptions = 0
        self.shared_blocks = 0  # block references saved by sharing prompt blocks
        self._admitted = 0

    @property
    def steps(self) -> int:
        return len(self.step_versions)

    @property
    def running(self) -> bool:
        return bool(self.pending or self.occupants)

    def wants_refill(self, refill_min: int) -> bool:
        """Requests wait and either nothing runs or at least `refill_min` slots (fewer if fewer wait) are free."""
        return bool(self.pending) and (not self.occupants or len(self.free) >= min(refill_min, len(self.pending)))

    # --- admission ------------------------------------------------------------------------------------------

    def _generated_before(self, index: int) -> int:
        """Tokens a waiting request generated before its preemption (0 for a new one)."""
        prior = self.resumed.get(index)
        return len(prior.tokens) if prior else 0

    def _prefill_len(self, index: int) -> int:
        return self.prompt_lengths[index] + self._generated_before(index)

    def _group_at_top(self, room: int) -> list[int]:
        """The next waiting request and the consecutive ones with its prompt (at most `room`)."""
        first = self.pending[-1]
        group = [first]
        if self.prompt_keys is None or first in self.resumed:
            return group
        key = self.prompt_keys[first]
        for index in reversed(self.pending[:-1]):
            if len(group) == room or index in self.resumed or self.prompt_keys[index] != key:
                break
            group.append(index)
        return group

    def _limit_left(self, index: int) -> int:
        return self.limits[index] - self._generated_before(index)

    def _headroom(self, length: int, limit: int, blocks: int) -> int:
        """Blocks a sequence holding `blocks` blocks for `length` tokens, with `limit` new tokens still allowed,
        can grow into in one run: at most run_blocks, none past its limit."""
        return max(0, min(self.run_blocks, blocks_for(length + limit - 1, self.block_size) - blocks))

    def admit(self) -> list[Admission]:
        """Admits waiting requests while slots and blocks allow, each group of samples of one prompt together
        (as many of its samples as fit), keeping free the blocks every running and admitted sequence can grow
        into in one run (`_headroom`), so that admitting does not make the next run preempt. When nothing runs,
        one request that fits only without that headroom is still admitted. `place` them once their prefill is
        queued. Raises ValueError when nothing runs and the pool cannot hold the next request at all."""
        admissions = []
        # what the running and the admitted sequences can grow into: summed once, then kept up to date
        headroom = sum(self._headroom(r.prompt_len, r.limit, len(r.blocks)) for r in self.occupants.values())
        while self.pending and self.free:
            group = self._group_at_top(len(self.free))
            length = self._prefill_len(group[0])
            prompt_blocks = blocks_for(length, self.block_size)
            full = length // self.block_size
            growth = [self._headroom(length, self._limit_left(index), prompt_blocks) for index in group]
            members = len(group)
            while members > 0:
                shared = full if members > 1 else 0
                need = shared + members * (prompt_blocks - shared)
                if need + headroom + sum(growth[:members]) <= self.pool.available:
                    break
                members -= 1
            if members == 0:
                if self.occupants or admissions:
                    break
                if prompt_blocks > self.pool.available:
                    raise ValueError(f"the KV pool ({self.pool.count - 1} blocks of {self.block_size} tokens) "
                                     f"cannot hold a sequence of {length} tokens")
                members = 1  # nothing runs: progress, even without room to grow
            group = group[:members]
            headroom += sum(growth[:members])
            shared = self.pool.take(full) if members > 1 else []
            if shared:
                self.pool.share([b for b in shared for _ in range(members - 1)])
                self.shared_blocks += len(shared) * (members - 1)
            own = [self.pool.take(prompt_blocks - len(shared)) for _ in group]
            slots, self.free = self.free[:members], self.free[members:]
            del self.pending[len(self.pending) - members:]  # the group sits at the top of the stack
            admissions.append(Admission(group, slots, length, shared, own))
        return admissions

    def place(self, admission: Admission, version: int) -> None:
        """`admission`'s requests now occupy their slots, their first token sampled with `version` before the
        next step."""
        for member, (index, slot) in enumerate(zip(admission.requests, admission.slots)):
            limit = self._limit_left(index)
            self.occupants[slot] = SlotRequest(index, admission.prefill_len, limit, version, self.steps, self.epoch,
                                               self._admitted, admission.table(member), len(admission.shared),
                                               self.resumed.pop(index, None))
            self._admitted += 1

    # --- blocks while decoding ------------------------------------------------------------------------------

    def _growth(self, request: SlotRequest, run: int) -> int:
        return blocks_for(request.length_bound(self.steps + run), self.block_size) - len(request.blocks)

    def victims(self, run: int) -> list[int]:
        """The slots to preempt, youngest first, so that every other occupant gets the blocks it can reach in the
        next `run` decode steps. Raises RuntimeError when the oldest occupant alone does not fit."""
        need = sum(max(0, self._growth(request, run)) for request in self.occupants.values())
        available = self.pool.available
        if need <= available:  # the common case: nothing to sort
            return []
        chosen = []
        for slot, request in sorted(self.occupants.items(), key=lambda item: -item[1].order):
            if need <= available:
                break
            if len(chosen) == len(self.occupants) - 1:
                raise RuntimeError(f"the KV pool ({self.pool.count - 1} blocks of {self.block_size} tokens) cannot "
                                   f"hold one sequence of {request.length_bound(self.steps + run)} tokens")
            chosen.append(slot)
            need -= max(0, self._growth(request, run))
            # what releasing every victim so far frees: a prompt's shared blocks once all its samples go
            available = self.pool.available + self.pool.freed_by([self.occupants[s].blocks for s in chosen])
        return chosen

    def grow(self, run: int) -> list[tuple[int, int, int]]:
        """Gives every occupant the blocks it can reach in the next `run` decode steps: (slot, table column,
        block) for each new block. Call after preempting `victims(run)`."""
        added = []
        for slot, request in sorted(self.occupants.items()):
            count = self._growth(request, run)
            if count > 0:
                for block in self.pool.take(count):
                    added.append((slot, len(request.blocks), block))
                    request.blocks.append(block)
        return added

    def preempt(self, slot: int, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        """The request in `slot` leaves it with the `tokens` it generated so far (their logprobs) and waits again
        at the head of the queue; its blocks go back to the pool."""
        request = self.end(slot)
        self.resumed[request.index] = Prior(list(tokens), list(logprobs), self.versions(request, len(tokens)))
        self.pending.append(request.index)
        self.preemptions += 1

    def end(self, slot: int) -> SlotRequest:
        """The request in `slot` has finished (seen outside a snapshot): it leaves, its blocks go back."""
        request = self.occupants.pop(slot)
        self.pool.release(request.blocks)
        self.free = sorted(self.free + [slot])
        return request

    # --- decoding -------------------------------------------------------------------------------------------

    def steps_to_run(self, sync_every: int) -> int:
        """Decode steps before the next snapshot: `sync_every`, fewer when every occupant reaches its limit
        sooner (0 with no occupant)."""
        remaining = [request.steps_left(self.steps) for request in self.occupants.values()]
        return max(0, min(sync_every, max(remaining, default=0)))

    def record_step(self, version: int) -> None:
        self.step_versions.append(version)

    def snapshot(self) -> int:
        """A status snapshot is queued: returns its epoch."""
        self.epoch += 1
        return self.epoch

    def finished(self, epoch: int, status: Sequence[int]) -> list[tuple[int, SlotRequest, int]]:
        """The slots snapshot `epoch` shows finished (status[slot] >= 0: its token count; -1: running), as
        (slot, request, tokens); they leave the schedule, their slots are free again and their blocks go back."""
        done = [(slot, request, int(status[slot])) for slot, request in sorted(self.occupants.items())
                if request.placed < epoch and status[slot] >= 0]
        for slot, request, _ in done:
            del self.occupants[slot]
            self.pool.release(request.blocks)
        self.free = sorted(self.free + [slot for slot, _, _ in done])
        return done

    def versions(self, request: SlotRequest, tokens: int) -> list[int]:
        """The version that sampled each of a request's first `tokens` tokens (those before a preemption too)."""
        before = request.generated_before
        first = request.first_step
        own = [request.first_version] + self.step_versions[first : first + tokens - before - 1]
        return (request.prior.versions if request.prior else []) + own[: tokens - before]

    def compaction(self) -> list[tuple[int, int]]:
        """With no request waiting: moves (source slot, free destination slot) that take every sequence below
        the decode batch size its count needs, so decode steps run on a smaller batch; none if that is not
        possible or not needed."""
        if self.pending or not self.occupants:
            return []
        target = decode_batch_size(len(self.occupants), self.slots)
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
