"""A discrete-event model of the whole system (`areal-async simulate`): how long a training step takes, how long
the generation and the training GPUs wait, and the trained tokens/s and trajectories/s that follow, for
synchronous (max_staleness 0) and asynchronous runs. Its rates come from measurements
(areal_async/planning/simulate_inputs.py reads the benchmarks' JSON); this module only moves time forward.

Units: seconds and tokens throughout. Deterministic given the seed: response lengths, zero-variance groups and the
order in which the first idle workers ask for work are drawn from it.

What is modelled, next to what the real code does:
- Admission (areal_async/actor_system/controller.py, staleness.py). A worker asks for up to groups_per_request groups; the
  controller admits while groups admitted less groups dropped < (version + max_staleness + 1) x groups_per_step.
  Idle workers ask in the order they became idle.
- Generation (actors/engine.py, actors/scheduler.py). A call's G x groups requests run through
  min(requests, slots) slots, `slots` being the sequences the engine's KV pool is planned to carry at once. A
  decode step costs `DecodeCost.step_s(batch, positions)`: `batch` is the decode batch size
  (areal_async/model/decode_batch.py) of the occupied slots (the call's slot count while requests wait; the occupied
  count once none wait, as the engine compacts), `positions` the cache positions the paged attention reads:
  each generating sequence's length + 1 (finished sequences still in their slot read nothing). The host looks
  at finished sequences after every run of sync_every steps and, on CUDA, reads each look one run late
  (`lookahead`): a finished slot frees (1 + lookahead) runs after the run it finished in at most, and is refilled
  once refill_fraction of the slots are free. A new prompt costs a prefill. A sequence that reaches its token
  limit ends its call at once; one that stopped earlier is only noticed at a look.
- Scoring and delivery (actors/rollout.py). When its call ends the worker scores every answer (reward_s each) and
  delivers its groups one at a time (host_s each: encoding and the queue's and the controller's calls; more,
  host_polled_s, while the learner polls for its step's groups). A group is zero-variance with probability
  filtered_fraction: the queue drops it and its admission slot is freed. A full queue (queue_capacity groups)
  makes the worker wait.
- The learner (areal_async/run/trainer.py). It takes groups first in, first out (take_s each), dropping those too
  stale for the step (oldest token version < step - max_staleness), until it holds groups_per_step; it trains for
  train_step_s + tokens / (learner_ranks x train_tokens_per_s); then it publishes: the controller's version moves
  on at once, every worker joins the round at its next token boundary (one that is scoring, once it has
  delivered), and the round ends weight_sync_s after the last one joined. A worker that was decoding then
  recomputes the KV cache of the sequences it holds (a prefill of their current lengths).

Not modelled: preemption when the KV pool runs dry (sequences are admitted up to `slots`), prompt blocks shared
within a group (a prefill per request), Ray's scheduling, processes sharing CPU cores, network contention, FSDP communication beyond what
the measured training rate includes, step-to-step variation of training time, failures.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from areal_async.model.decode_batch import decode_batch_size


@dataclass(frozen=True)
class DecodeCost:
    """What a rollout engine's work costs. A decode step over `batch` slots whose attention reads `positions` cache
    positions in all takes fixed_s + per_slot_s x batch + per_kv_s x positions seconds; a prefill (new prompts, or
    the cache recomputed after a weight swap) prefill_token_s seconds per token."""

    fixed_s: float
    per_slot_s: float
    per_kv_s: float
    prefill_token_s: float

    def __post_init__(self) -> None:
        for name in ("fixed_s", "per_slot_s", "per_kv_s", "prefill_token_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"DecodeCost.{name} must be >= 0, got {getattr(self, name)}")
        if self.fixed_s + self.per_slot_s <= 0:
            raise ValueError("DecodeCost: a decode step must cost something (fixed_s + per_slot_s > 0)")

    def step_s(self, batch: int, positions: int) -> float:
        """Seconds of one decode step."""
        return self.fixed_s + self.per_slot_s * batch + self.per_kv_s * positions

    def steps_s(self, batch: int, count: int, positions: int) -> float:
        """Seconds of `count` decode steps over `batch` slots that read `positions` cache positions in all."""
        return count * (self.fixed_s + self.per_slot_s * batch) + self.per_kv_s * positions

    def describe(self) -> str:
        return (f"decode step {self.fixed_s * 1e3:.3f} ms + {self.per_slot_s * 1e6:.3f} us per slot + "
                f"{self.per_kv_s * 1e9:.3f} ns per cache position read; prefill "
                f"{self.prefill_token_s * 1e6:.2f} us per token")


@dataclass(frozen=True)
class EngineModel:
    """A rollout engine's settings (engine.* in the config). slots: sequences decoded at once (engine.max_slots,
    or fewer when the KV pool is planned to carry fewer); lookahead: runs of sync_every steps queued ahead of the
    host's look (1 on CUDA, 0 on CPU)."""

    slots: int
    sync_every: int = 8
    lookahead: int = 1
    refill_fraction: float = 1 / 16

    def __post_init__(self) -> None:
        if self.slots < 1 or self.sync_every < 1 or self.lookahead < 0:
            raise ValueError(f"EngineModel needs slots, sync_every >= 1 and lookahead >= 0: {self}")
        if not 0 < self.refill_fraction <= 1:
            raise ValueError(f"EngineModel.refill_fraction must be in (0, 1], got {self.refill_fraction}")


@dataclass(frozen=True)
class LengthModel:
    """Response lengths in tokens: log-normal with mean `mean` before clipping (sigma of the log), clipped to
    [low, cap]; sigma 0 gives `mean` every time (rounded). `cap` is generation.max_new_tokens: a response of
    `cap` tokens ended at its limit, a shorter one at a stop token."""

    mean: float
    cap: int
    sigma: float = 1.0
    low: int = 1

    def __post_init__(self) -> None:
        if self.mean <= 0 or self.sigma < 0 or not 1 <= self.low <= self.cap:
            raise ValueError(f"LengthModel needs mean > 0, sigma >= 0 and 1 <= low <= cap: {self}")

    def draw(self, rng: random.Random) -> int:
        value = self.mean if self.sigma == 0 else math.exp(math.log(self.mean) - self.sigma ** 2 / 2
                                                           + self.sigma * rng.gauss(0.0, 1.0))
        return int(min(self.cap, max(self.low, round(value))))


@dataclass(frozen=True)
class SystemModel:
    """The system a simulation runs. Rates and costs are seconds unless named otherwise:
    train_tokens_per_s -- trained tokens (prompt + response) per second of one learner rank, ranks splitting
        a step's tokens evenly; train_step_s -- per step, whatever its size;
    weight_sync_s -- a publish round, from the last worker joining to every worker holding the version;
    reward_s -- scoring one trajectory on its worker;
    host_s -- delivering one group; host_polled_s -- the same while the learner gathers its step (None: host_s):
        the trainer then polls the queue and the controller actors every few milliseconds, and on a busy CPU a
        worker's calls to them wait behind its polls (measured 3 ms a group while the learner trained and 50 to
        100 ms while it gathered, CPU Ray runs on 2 cores);
    take_s -- the learner taking one group from the queue;
    filtered_fraction -- the share of groups the queue drops as zero-variance;
    queue_capacity -- groups the queue holds (None: no bound);
    learner_start_s -- when the learner starts its first step (workers start at 0; a run's held-out evaluation
        before training gives them this head start)."""

    rollout_workers: int
    learner_ranks: int
    groups_per_step: int
    group_size: int
    groups_per_request: int
    max_staleness: int | None
    prompt_tokens: int
    lengths: LengthModel
    engine: EngineModel
    decode: DecodeCost
    train_tokens_per_s: float
    train_step_s: float = 0.0
    weight_sync_s: float = 0.0
    reward_s: float = 0.0
    host_s: float = 0.0
    host_polled_s: float | None = None
    take_s: float = 0.0
    filtered_fraction: float = 0.0
    queue_capacity: int | None = None
    learner_start_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rollout_workers", "learner_ranks", "groups_per_step", "group_size", "groups_per_request",
                     "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SystemModel.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"SystemModel.max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.train_tokens_per_s <= 0:
            raise ValueError(f"SystemModel.train_tokens_per_s must be > 0, got {self.train_tokens_per_s}")
        for name in ("train_step_s", "weight_sync_s", "reward_s", "host_s", "take_s", "learner_start_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"SystemModel.{name} must be >= 0, got {getattr(self, name)}")
        if self.host_polled_s is not None and self.host_polled_s < 0:
            raise ValueError(f"SystemModel.host_polled_s must be >= 0 or None, got {self.host_polled_s}")
        if not 0 <= self.filtered_fraction < 1:
            raise ValueError(f"SystemModel.filtered_fraction must be in [0, 1), got {self.filtered_fraction}")
        if self.queue_capacity is not None and self.queue_capacity < self.groups_per_step:
            raise ValueError(f"SystemModel.queue_capacity={self.queue_capacity} holds less than one step "
                             f"(groups_per_step={self.groups_per_step}): the learner could never start")

    def train_s(self, tokens: int) -> float:
        """Seconds the learner ranks train a step of `tokens` tokens."""
        return self.train_step_s + tokens / (self.learner_ranks * self.train_tokens_per_s)


# ---------------------------------------------------------------------------------------------- engine arithmetic


def notice_step(finish_step: int, sync_every: int, lookahead: int) -> int:
    """The call's decode step at which the host frees the slot of a sequence that finished at `finish_step`: the
    end of the run of sync_every steps it finished in, plus `lookahead` runs."""
    return (-(-finish_step // sync_every) + lookahead) * sync_every


def growing_positions(offsets: int, count_growing: int, step: int, count: int) -> int:
    """Cache positions the generating sequences read over `count` decode steps from `step`: at step s each reads
    its length + 1, prompt + (s - start) + 1, and `offsets` is the sum of prompt - start over the
    `count_growing` of them."""
    return count * (offsets + count_growing) + count_growing * (count * step + count * (count - 1) // 2)


# ---------------------------------------------------------------------------------------------- one generate call


@dataclass
class Group:
    """An admitted prompt group. `filtered`: the queue drops it as zero-variance; `oldest_version`: the version of
    its first sampled token (set at its first prefill); `tokens`: prompt + response tokens of its G answers."""

    filtered: bool
    tokens: int = 0
    oldest_version: int | None = None


@dataclass(frozen=True)
class Request:
    """One answer to generate: `length` response tokens of at most `limit` (its max_new_tokens); shorter than the
    limit, it ended at a stop token."""

    prompt: int
    length: int
    limit: int
    group: Group | None = None


class _Sequence:
    __slots__ = ("request", "start", "finish", "limit_end", "release", "held", "gone")

    def __init__(self, request: Request, start: int) -> None:
        self.request, self.start = request, start
        self.finish = start + request.length - 1  # the first token comes from the prefill
        self.limit_end = start + request.limit - 1
        self.release = 0
        self.held = False  # finished, its slot not yet freed
        self.gone = False  # its slot freed

    @property
    def final_length(self) -> int:
        return self.request.prompt + self.request.length - 1


class EngineCall:
    """One generate call: `requests` through min(len(requests), engine.slots) slots, from time `now` at
    `version`. The call moves from event to event (a sequence finishes, a slot frees, the call ends); between
    two events the batch is fixed and its cost a closed form. `clock`: when the call reaches `step`, its count of
    decode steps so far."""

    def __init__(self, requests: Sequence[Request], engine: EngineModel, cost: DecodeCost, now: float,
                 version: int) -> None:
        if not requests:
            raise ValueError("a generate call needs at least one request")
        self.engine, self.cost, self.version = engine, cost, version
        self.pending = deque(requests)
        self.slots = min(len(requests), engine.slots)
        self.refill_min = max(1, int(self.slots * engine.refill_fraction))
        self.step, self.clock = 0, now
        self.occupied = 0
        self.done = False
        self._order = itertools.count()
        self._growing: list[tuple[int, int, _Sequence]] = []  # by finish step
        self._held: list[tuple[int, int, _Sequence]] = []  # finished, slot not yet free: by release step
        self._limit_ends: list[tuple[int, int, _Sequence]] = []  # occupants by -(start + limit - 1): lazy
        self._growing_offsets = 0  # sum of prompt - start over growing sequences
        self._held_tokens = 0
        self._admit()
        self._settle()

    # --- state at the current step ------------------------------------------------------------------------

    def _batch(self) -> int:
        return decode_batch_size(self.slots if self.pending else self.occupied, self.engine.slots)

    def _next_event_step(self) -> int:
        return min(heap[0][0] for heap in (self._growing, self._held) if heap)

    def _last_limit_end(self) -> int:
        """The step at which every occupant has reached its token limit: the engine ends a call there at the
        latest, without waiting for its next look."""
        heap = self._limit_ends
        while heap[0][2].gone:
            heapq.heappop(heap)
        return -heap[0][0]

    def held_tokens(self) -> int:
        """Tokens in the cache of every occupied slot: what a recompute after a weight swap prefills."""
        return self._growing_offsets + len(self._growing) * self.step + self._held_tokens

    def segment_s(self, count: int) -> float:
        """Seconds of the next `count` decode steps (no event among them)."""
        positions = growing_positions(self._growing_offsets, len(self._growing), self.step, count)
        return self.cost.steps_s(self._batch(), count, positions)

    # --- moving forward -----------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Prefills waiting requests into the free slots."""
        count = min(self.slots - self.occupied, len(self.pending))
        tokens = 0
        for _ in range(count):
            request = self.pending.popleft()
            sequence = _Sequence(request, self.step)
            tokens += request.prompt
            if request.group is not None and request.group.oldest_version is None:
                request.group.oldest_version = self.version
            order = next(self._order)
            heapq.heappush(self._growing, (sequence.finish, order, sequence))
            heapq.heappush(self._limit_ends, (-sequence.limit_end, order, sequence))
            self._growing_offsets += request.prompt - self.step
        self.occupied += count
        self.clock += tokens * self.cost.prefill_token_s

    def _settle(self) -> None:
        """Handles every event due at the current step: finishes, freed slots, refills, the end of the call."""
        engine = self.engine
        while self._growing and self._growing[0][0] <= self.step:
            _, order, sequence = heapq.heappop(self._growing)
            self._growing_offsets -= sequence.request.prompt - sequence.start
            sequence.held = True
            sequence.release = min(notice_step(sequence.finish, engine.sync_every, engine.lookahead),
                                   self._last_limit_end())
            self._held_tokens += sequence.final_length
            heapq.heappush(self._held, (sequence.release, order, sequence))
        while self._held and self._held[0][0] <= self.step:
            _, _, sequence = heapq.heappop(self._held)
            sequence.held, sequence.gone = False, True
            self._held_tokens -= sequence.final_length
            self.occupied -= 1
        free = self.slots - self.occupied
        if self.pending and (not self.occupied or free >= min(self.refill_min, len(self.pending))):
            self._admit()
            self._settle()  # a request of one token finishes in its prefill
            return
        self.done = not self.pending and not self.occupied

    def next_event_time(self) -> float:
        return self.clock + self.segment_s(self._next_event_step() - self.step)

    def advance(self) -> None:
        """Moves to the next event and handles it."""
        count = self._next_event_step() - self.step
        self.clock += self.segment_s(count)
        self.step += count
        self._settle()

    def _steps_until(self, when: float) -> int:
        """The fewest decode steps from now that end at or after `when` (at most those to the next event)."""
        low, high = 1, self._next_event_step() - self.step
        while low < high:
            middle = (low + high) // 2
            if self.clock + self.segment_s(middle) >= when:
                high = middle
            else:
                low = middle + 1
        return low

    def boundary_at_or_after(self, when: float) -> float:
        """The time of the first token boundary at or after `when`, the next event's at the latest."""
        return self.clock if when <= self.clock else self.clock + self.segment_s(self._steps_until(when))

    def move_to(self, boundary: float) -> None:
        """Moves to the token boundary at `boundary` (from `boundary_at_or_after`), handling an event there."""
        if boundary <= self.clock:
            return
        count = self._steps_until(boundary)
        due = count == self._next_event_step() - self.step
        self.clock += self.segment_s(count)
        self.step += count
        if due:
            self._settle()

    def resume(self, now: float, version: int) -> None:
        """Continues at `now` with weights `version`: first the cache of every occupied slot is recomputed."""
        self.version = version
        self.clock = now + self.held_tokens() * self.cost.prefill_token_s

    def run_alone(self) -> float:
        """Runs the call to its end without interruption; returns its end time."""
        while not self.done:
            self.advance()
        return self.clock


def call_seconds(requests: Sequence[Request], engine: EngineModel, cost: DecodeCost) -> float:
    """Seconds one generate call of `requests` takes on an engine of nothing else."""
    return EngineCall(requests, engine, cost, 0.0, 0).run_alone()


# ---------------------------------------------------------------------------------------------- the whole system


class WorkerState(enum.Enum):
    decode = "decode"  # decoding, prefilling or recomputing: the GPU works
    sync = "sync"  # in a publish round
    host = "host"  # scoring and delivering: the GPU waits for the CPU
    wait = "wait"  # nothing admitted (the staleness rule) or the queue is full


@dataclass(frozen=True)
class StepRecord:
    """One training step. Times are seconds since the start; `worker_s` sums each WorkerState's seconds over the
    rollout workers during the step."""

    step: int
    start: float
    gathered: float
    trained: float
    end: float
    trajectories: int
    trained_tokens: int
    stale_dropped: int
    staleness: tuple[int, ...]  # per group: step - oldest token version
    worker_s: dict[str, float]

    @property
    def step_s(self) -> float:
        return self.end - self.start

    @property
    def gather_s(self) -> float:
        return self.gathered - self.start

    @property
    def train_s(self) -> float:
        return self.trained - self.gathered

    @property
    def sync_s(self) -> float:
        return self.end - self.trained


@dataclass(eq=False)  # workers are told apart by identity
class _Worker:
    index: int
    state: WorkerState = WorkerState.wait
    since: float = 0.0
    totals: dict[WorkerState, float] = field(default_factory=lambda: dict.fromkeys(WorkerState, 0.0))
    call: EngineCall | None = None
    groups: list[Group] = field(default_factory=list)
    token: int = 0  # invalidates scheduled call events
    joined: bool = False
    deliveries: deque = field(default_factory=deque)
    blocked: bool = False


class Simulation:
    """The event loop over a SystemModel. `run(steps)` simulates that many training steps and returns their
    records. `calls` counts generate calls; `filtered` and `stale` the groups dropped."""

    def __init__(self, model: SystemModel, seed: int) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable, tuple]] = []
        self._order = itertools.count()
        self.workers = [_Worker(index) for index in range(model.rollout_workers)]
        order = list(self.workers)
        self.rng.shuffle(order)  # who asks first at the start
        self.idle: deque[_Worker] = deque(order)
        self.version = 0
        self.admitted = self.freed = 0
        self.queue: deque[Group] = deque()
        self.calls = self.filtered = self.stale = 0
        self.records: list[StepRecord] = []
        self._round_active = False
        self._joined = 0
        self._step = 0
        self._batch: list[Group] = []
        self._step_start = self._gathered = self._trained = 0.0
        self._take_clock = 0.0
        self._gathering = False
        self._stale_in_step = 0
        self._totals_at_start = self._worker_totals()

    # --- events -------------------------------------------------------------------------------------------

    def _at(self, when: float, handler: Callable, *args) -> None:
        heapq.heappush(self._events, (when, next(self._order), handler, args))

    def run(self, steps: int) -> list[StepRecord]:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self._at(self.model.learner_start_s, self._start_step)
        self._wake()
        while self._events and len(self.records) < steps:
            when, _, handler, args = heapq.heappop(self._events)
            self.now = when
            handler(*args)
        if len(self.records) < steps:
            raise RuntimeError(f"the simulation stalled after {len(self.records)} steps (nothing left to happen)")
        return self.records

    # --- workers ------------------------------------------------------------------------------------------

    def _set(self, worker: _Worker, state: WorkerState) -> None:
        worker.totals[worker.state] += self.now - worker.since
        worker.state, worker.since = state, self.now

    def _worker_totals(self) -> dict[str, float]:
        totals = dict.fromkeys((s.value for s in WorkerState), 0.0)
        for worker in self.workers:
            for state, seconds in worker.totals.items():
                totals[state.value] += seconds
            totals[worker.state.value] += self.now - worker.since
        return totals

    def _admissible(self) -> int:
        model = self.model
        if model.max_staleness is None:
            return model.groups_per_request
        occupied = self.admitted - self.freed
        return (self.version + model.max_staleness + 1) * model.groups_per_step - occupied

    def _wake(self) -> None:
        """Idle workers ask for groups in the order they became idle."""
        for worker in list(self.idle):
            if self._admissible() <= 0:
                break
            self._admit(worker)

    def _admit(self, worker: _Worker) -> None:
        """`worker` asks for groups; it starts its call at once unless a publish round holds it."""
        model = self.model
        count = min(model.groups_per_request, self._admissible())
        if count <= 0:
            return
        self.idle.remove(worker)
        for _ in range(count):
            worker.groups.append(Group(self.rng.random() < model.filtered_fraction))
            self.admitted += 1
        if not self._round_active:
            self._start_call(worker)

    def _start_call(self, worker: _Worker) -> None:
        model, lengths = self.model, self.model.lengths
        requests = []
        for group in worker.groups:
            for _ in range(model.group_size):
                length = lengths.draw(self.rng)
                group.tokens += model.prompt_tokens + length
                requests.append(Request(model.prompt_tokens, length, lengths.cap, group))
        self.calls += 1
        self._set(worker, WorkerState.decode)
        worker.call = EngineCall(requests, model.engine, model.decode, self.now, self.version)
        self._schedule_call(worker)

    def _schedule_call(self, worker: _Worker) -> None:
        worker.token += 1
        call = worker.call
        self._at(call.clock if call.done else call.next_event_time(), self._call_event, worker, worker.token)

    def _call_event(self, worker: _Worker, token: int) -> None:
        if token != worker.token:
            return
        call = worker.call
        if not call.done:
            call.advance()
        if call.done:
            self._end_call(worker)
        else:
            self._schedule_call(worker)

    def _end_call(self, worker: _Worker) -> None:
        model = self.model
        worker.call = None
        worker.token += 1
        self._set(worker, WorkerState.host)
        worker.deliveries = deque(worker.groups)
        worker.groups = []
        scoring = model.reward_s * model.group_size * len(worker.deliveries)
        self._at(self.now + scoring + self._host_s(), self._deliver, worker)

    def _host_s(self) -> float:
        """Seconds of the next group's delivery, which depend on whether the learner is polling for groups."""
        model = self.model
        return model.host_polled_s if self._gathering and model.host_polled_s is not None else model.host_s

    def _deliver(self, worker: _Worker) -> None:
        """Delivers the worker's next group; a full queue refuses it (zero-variance or not: the shard decodes only
        what it accepts) and the worker waits for the learner's next take."""
        model = self.model
        group = worker.deliveries[0]
        if model.queue_capacity is not None and len(self.queue) >= model.queue_capacity:
            worker.blocked = True
            self._set(worker, WorkerState.wait)
            if self._round_active and not worker.joined:
                self._join(worker)
            return
        worker.deliveries.popleft()
        if group.filtered:
            self.filtered += 1
            self.freed += 1
            self._wake()
        else:
            self.queue.append(group)
            self._take()
        if worker.deliveries:
            self._at(self.now + self._host_s(), self._deliver, worker)
            return
        self._set(worker, WorkerState.wait)
        self.idle.append(worker)
        self._admit(worker)
        if self._round_active and not worker.joined:
            self._join(worker)

    def _unblock(self) -> None:
        for worker in self.workers:
            if worker.blocked and len(self.queue) < self.model.queue_capacity:
                worker.blocked = False
                if not worker.joined:
                    self._set(worker, WorkerState.host)
                self._deliver(worker)

    # --- the learner --------------------------------------------------------------------------------------

    def _start_step(self) -> None:
        self._step_start = self._take_clock = self.now
        self._batch, self._stale_in_step = [], 0
        self._gathering = True
        self._take()

    def _take(self) -> None:
        """The learner takes what the queue holds, up to the step's groups, dropping those too stale."""
        model = self.model
        if not self._gathering:
            return
        took = False
        while self.queue and len(self._batch) < model.groups_per_step:
            group = self.queue.popleft()
            took = True
            self._take_clock = max(self._take_clock, self.now) + model.take_s
            if model.max_staleness is not None and group.oldest_version < self._step - model.max_staleness:
                self.stale += 1
                self._stale_in_step += 1
                self.freed += 1
            else:
                self._batch.append(group)
        if len(self._batch) == model.groups_per_step:
            self._gathering = False  # before the wake-ups below, which may deliver (and call this) again
            self._at(self._take_clock, self._train)
        if took:
            self._wake()
            if model.queue_capacity is not None:
                self._unblock()

    def _train(self) -> None:
        self._gathered = self.now
        tokens = sum(group.tokens for group in self._batch)
        self._at(self.now + self.model.train_s(tokens), self._publish)

    def _publish(self) -> None:
        self._trained = self.now
        self.version += 1
        self._round_active = True
        self._joined = 0
        self._wake()
        for worker in self.workers:
            if worker.state is WorkerState.decode:
                boundary = worker.call.boundary_at_or_after(self.now)
                worker.token += 1
                self._at(boundary, self._join_at_boundary, worker, worker.token)
            elif worker.state is WorkerState.wait:
                self._join(worker)
            # a worker scoring or delivering joins once it has delivered (_deliver)

    def _join_at_boundary(self, worker: _Worker, token: int) -> None:
        if token != worker.token:
            return
        worker.call.move_to(self.now)
        if worker.call.done:  # it ended there: it scores and delivers first
            self._end_call(worker)
        else:
            self._join(worker)

    def _join(self, worker: _Worker) -> None:
        worker.joined = True
        self._set(worker, WorkerState.sync)
        self._joined += 1
        if self._joined == len(self.workers):
            self._at(self.now + self.model.weight_sync_s, self._end_round)

    def _end_round(self) -> None:
        self._round_active = False
        for worker in self.workers:
            worker.joined = False
            if worker.call is not None:
                self._set(worker, WorkerState.decode)
                worker.call.resume(self.now, self.version)
                self._schedule_call(worker)
            elif worker.groups:
                self._start_call(worker)
            else:
                self._set(worker, WorkerState.wait)
        self._record()
        self._wake()
        self._step += 1
        self._start_step()

    def _record(self) -> None:
        model = self.model
        totals = self._worker_totals()
        self.records.append(StepRecord(
            step=self._step, start=self._step_start, gathered=self._gathered, trained=self._trained, end=self.now,
            trajectories=len(self._batch) * model.group_size,
            trained_tokens=sum(group.tokens for group in self._batch),
            stale_dropped=self._stale_in_step,
            staleness=tuple(self._step - group.oldest_version for group in self._batch),
            worker_s={state: totals[state] - self._totals_at_start[state] for state in totals},
        ))
        self._totals_at_start = totals


def simulate(model: SystemModel, steps: int, seed: int = 0) -> list[StepRecord]:
    """`steps` training steps of `model`."""
    return Simulation(model, seed).run(steps)


# ---------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Summary:
    """Means over the steps after the first `warmup` (the pipeline filling). Fractions of the generation GPUs'
    time (decode, sync, host, wait) add up to 1; the training GPUs train for train_busy of the time and wait
    for data or the publish round for the rest."""

    steps: int
    warmup: int
    step_s: float
    gather_s: float
    train_s: float
    sync_s: float
    trajectories_per_s: float
    trained_tokens_per_s: float
    generation: dict[str, float]
    train_busy: float
    stale_dropped_per_step: float
    staleness_mean: float
    staleness_max: int
    first_steps_s: float  # the warm-up steps together

    @property
    def generation_idle(self) -> float:
        return 1.0 - self.generation["decode"]

    @property
    def train_idle(self) -> float:
        return 1.0 - self.train_busy


def summarize(records: Sequence[StepRecord], warmup: int) -> Summary:
    """The steady state of a simulation: `records` after the first `warmup`."""
    if not 0 <= warmup < len(records):
        raise ValueError(f"warmup={warmup} leaves no step of {len(records)} to summarize")
    steady = records[warmup:]
    elapsed = steady[-1].end - steady[0].start
    worker_s = {state.value: sum(r.worker_s[state.value] for r in steady) for state in WorkerState}
    all_worker_s = sum(worker_s.values())
    staleness = [s for r in steady for s in r.staleness]
    return Summary(
        steps=len(steady),
        warmup=warmup,
        step_s=elapsed / len(steady),
        gather_s=statistics.fmean(r.gather_s for r in steady),
        train_s=statistics.fmean(r.train_s for r in steady),
        sync_s=statistics.fmean(r.sync_s for r in steady),
        trajectories_per_s=sum(r.trajectories for r in steady) / elapsed,
        trained_tokens_per_s=sum(r.trained_tokens for r in steady) / elapsed,
        generation={state: seconds / all_worker_s for state, seconds in worker_s.items()},
        train_busy=sum(r.train_s for r in steady) / elapsed,
        stale_dropped_per_step=sum(r.stale_dropped for r in steady) / len(steady),
        staleness_mean=statistics.fmean(staleness),
        staleness_max=max(staleness),
        first_steps_s=records[warmup - 1].end if warmup else 0.0,
    )


def hours_for(summary: Summary, steps: int) -> float:
    """Hours for `steps` training steps: the warm-up steps as simulated, the rest at the steady step time."""
    return (summary.first_steps_s + max(0, steps - summary.warmup) * summary.step_s) / 3600
