"""Invariants 1 (staleness) and 2 (conservation) of the whole actor-learner loop, as a hypothesis state machine.

The real RolloutController and ShardedReplayQueue are driven by simulated rollout workers and a simulated
learner. Workers lag: each has its own weights version <= the learner's, adopted only when a publish
reaches it, and a generation interrupted by an update carries several token versions. Groups may fail
(readmitted), arrive corrupted (bad_frame), have equal rewards (zero_variance), meet a full shard (kept
and retried) or arrive too stale (dropped at take).

The learner needs exactly groups_per_step groups per step. It takes whatever the queue offers, up to what
its batch still lacks, and keeps a partial batch until it is complete. Waiting instead until the queue
alone holds a whole batch can deadlock: with max_staleness = 0 the admission rule leaves room for only
groups_per_step - len(batch) more groups, and shards may refuse groups before K * capacity reaches a batch.
"""

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from areal_async.actor_system.controller import RolloutController
from areal_async.data.records import PromptRecord
from areal_async.actor_system.ledger import DROP_REASONS, Ledger
from areal_async.actor_system.replay_queue import ShardedReplayQueue, group_oldest_version
from areal_async.types import PromptGroup, Trajectory
from areal_async.actor_system.wire import encode_group

RECORDS = [PromptRecord(query_id=f"q{i}", prompt=f"prompt {i}", solutions=("1",)) for i in range(3)]
REWARDS = (5.0, -5.0)
LIVENESS_STEPS = 3  # versions the learner must still reach in the final phase
LIVENESS_ROUNDS = 30  # rounds of admit / finish / train it gets to do so
MAX_WORKERS = 3
# repeated entries make an event more likely: most generations finish, a few fail or arrive corrupted
EVENTS = ("admit",) * 3 + ("publish seen by worker",) * 2 + ("finish",) * 4 + ("fail", "corrupt") + (
    "retry refused group",) * 2 + ("train",) * 3


@dataclass
class Worker:
    """A simulated rollout worker: weights at `version`; `generating` holds (group, version at its start);
    `outbox` holds finished groups a full shard refused: (group id, frame, the outcome the queue should give)."""

    version: int = 0
    generating: list[tuple[PromptGroup, int]] = field(default_factory=list)
    outbox: deque[tuple[str, bytes, str]] = field(default_factory=deque)


def finished_group(group: PromptGroup, token_versions: list[list[int]], rewards: list[float]) -> list[Trajectory]:
    """The G trajectories of `group`: sample i has one output token per entry of token_versions[i]."""
    return [
        Trajectory(
            query_id=group.query_id,
            group_id=group.group_id,
            sample_index=index,
            prompt_tokens=group.prompt_tokens,
            output_tokens=np.full(len(versions), 7, dtype=np.int32),
            behaviour_logprobs=np.full(len(versions), -0.5, dtype=np.float32),
            versions=np.array(versions, dtype=np.int32),
            reward=reward,
            finish_reason="stop",
        )
        for index, (versions, reward) in enumerate(zip(token_versions, rewards))
    ]


class ActorLearnerLoop(RuleBasedStateMachine):
    @initialize(
        groups_per_step=st.integers(1, 4),
        group_size=st.integers(1, 3),
        max_staleness=st.sampled_from([0, 1, 2, None]),
        num_shards=st.integers(1, 3),
        capacity=st.integers(1, 8),
        num_workers=st.integers(1, MAX_WORKERS),
        max_oversample=st.sampled_from([1.0, 3.0]),
    )
    def start(self, groups_per_step, group_size, max_staleness, num_shards, capacity, num_workers, max_oversample):
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.max_oversample = max_oversample
        # With G = 1 every group has zero reward variance: the filter must be off or nothing ever trains.
        self.filter_zero_variance = group_size > 1
        self.controller = RolloutController(RECORDS, encode=lambda s: [1, 2, 3], group_size=group_size,
                                            groups_per_step=groups_per_step, max_staleness=max_staleness, seed=0,
                                            max_oversample=max_oversample)
        self.queue = ShardedReplayQueue(num_shards, capacity, max_staleness,
                                        filter_zero_variance=self.filter_zero_variance)
        self.workers = [Worker() for _ in range(num_workers)]
        self.learner_version = 0
        self.batch: list[list[Trajectory]] = []  # taken for the next step, which needs groups_per_step
        self.awaiting_readmission: deque[str] = deque()  # failed group ids, in the order they failed
        self.admitted_ids: set[str] = set()
        self.delivered_ids: set[str] = set()
        self.expected_drops: Counter = Counter()

    @rule(event=st.sampled_from(EVENTS), index=st.integers(0, MAX_WORKERS - 1), data=st.data())
    def event(self, event, index, data):
        """One event of the running system, for worker `index` where it concerns a worker. A single rule
        rather than one per event: hypothesis often leaves whole rules out of an example, and without
        admit, finish and train together no training step ever happens."""
        worker = self.workers[index % len(self.workers)]
        if event == "admit":
            self.worker_asks_for_groups(worker, data.draw(st.integers(1, 4), label="groups wanted"))
        elif event == "publish seen by worker":
            worker.version = self.learner_version
        elif event == "retry refused group" and worker.outbox:
            self.deliver(worker, *worker.outbox.popleft())
        elif event == "train":
            self.learner_takes()
        elif event in ("finish", "fail", "corrupt") and worker.generating:
            which = data.draw(st.integers(0, len(worker.generating) - 1), label="which generation")
            group, started = worker.generating.pop(which)
            self.end_generation(worker, group, started, event, data)

    # ------------------------------------------------------------------------------------ workers

    def admit(self, worker: Worker) -> bool:
        group = self.controller.admit(self.learner_version)
        if group is None:
            return False
        if self.awaiting_readmission:  # a failed group is handed out again before any new one
            assert group.group_id == self.awaiting_readmission.popleft()
        else:
            assert group.group_id not in self.admitted_ids
            self.admitted_ids.add(group.group_id)
        worker.generating.append((group, worker.version))
        return True

    def worker_asks_for_groups(self, worker: Worker, wanted: int) -> None:
        for _ in range(wanted):
            if not self.admit(worker):
                break

    def end_generation(self, worker: Worker, group: PromptGroup, started: int, event: str, data) -> None:
        """The generation of `group`, begun at version `started`, finishes, fails or yields a corrupted frame."""
        if event == "fail":
            self.controller.readmit(group)
            self.awaiting_readmission.append(group.group_id)
            return
        # an interrupted generation carries versions from the one at its start to the worker's current one
        token_versions = [
            sorted(data.draw(st.lists(st.integers(started, worker.version), max_size=3), label="token versions"))
            for _ in range(group.group_size)
        ]
        rewards = data.draw(st.lists(st.sampled_from(REWARDS), min_size=group.group_size,
                                     max_size=group.group_size), label="rewards")
        frame = encode_group(finished_group(group, token_versions, rewards))
        if event == "corrupt":
            cut = data.draw(st.integers(0, len(frame) - 1), label="truncated at")
            self.deliver(worker, group.group_id, frame[:cut], "bad_frame")
        elif self.filter_zero_variance and len(set(rewards)) == 1:
            self.deliver(worker, group.group_id, frame, "zero_variance")
        else:
            self.deliver(worker, group.group_id, frame, "queued")

    def deliver(self, worker: Worker, group_id: str, frame: bytes, expected: str) -> None:
        outcome = self.queue.put(group_id, frame)
        if outcome == "full":  # backpressure: keep the group, retry later
            worker.outbox.append((group_id, frame, expected))
            return
        assert outcome == expected
        assert group_id not in self.delivered_ids
        self.delivered_ids.add(group_id)
        self.controller.delivered(group_id, dropped=outcome != "queued")
        if outcome != "queued":
            self.expected_drops[outcome] += 1

    # ------------------------------------------------------------------------------------ learner

    def learner_takes(self) -> None:
        needed = self.groups_per_step - len(self.batch)
        groups, stale = self.queue.take(needed, training_step=self.learner_version)
        assert len(groups) <= needed
        self.controller.free_slots(stale)
        self.expected_drops["stale"] += stale
        self.batch.extend(groups)
        if len(self.batch) == self.groups_per_step:
            self.train_step()

    def train_step(self) -> None:
        step = self.learner_version
        for group in self.batch:
            oldest = group_oldest_version(group)
            assert oldest <= step, "a token from a policy version the learner has not produced yet"
            if self.max_staleness is not None:  # invariant 1
                assert oldest >= step - self.max_staleness, f"step {step} trains a group from version {oldest}"
        self.batch = []
        self.learner_version += 1

    # ------------------------------------------------------------------------------------ invariants

    @invariant()
    def books_balance(self):
        controller, counts = self.controller, self.queue.shard_counts()
        ledger = Ledger.combine(controller.produced, controller.in_flight, counts)
        assert ledger.balanced, ledger.totals()  # invariant 2
        held_by_workers = sum(len(w.generating) + len(w.outbox) for w in self.workers)
        assert controller.in_flight == held_by_workers + len(self.awaiting_readmission)
        assert ledger.queued == self.queue.depth
        assert ledger.consumed == self.learner_version * self.groups_per_step + len(self.batch)
        assert {r: ledger.dropped[r] for r in DROP_REASONS} == {r: self.expected_drops[r] for r in DROP_REASONS}
        # every drop gave its admission slot back
        assert controller.occupied_slots == controller.produced - sum(ledger.dropped.values())
        if self.max_staleness is not None:  # the admission bound: a group in flight takes at least 1/max_oversample
            assert controller.occupied_slots <= (
                (self.learner_version + self.max_staleness + 1) * self.groups_per_step * self.max_oversample)
        assert all(w.version <= self.learner_version for w in self.workers)

    def teardown(self):
        """Liveness: without failures, rounds of admit / finish / train keep the learner stepping."""
        if not hasattr(self, "controller"):
            return
        target = self.learner_version + LIVENESS_STEPS
        for _ in range(LIVENESS_ROUNDS):
            if self.learner_version >= target:
                break
            self.liveness_round()
        ledger = Ledger.combine(self.controller.produced, self.controller.in_flight, self.queue.shard_counts())
        assert self.learner_version >= target, f"deadlock at version {self.learner_version}: {ledger.totals()}"

    def liveness_round(self) -> None:
        """Every worker adopts the latest weights, delivers what it holds, admits up to a batch and
        finishes it (rewards alternate, so no group is zero-variance); then the learner empties the queue."""
        for worker in self.workers:
            worker.version = self.learner_version
            for _ in range(len(worker.outbox)):
                self.deliver(worker, *worker.outbox.popleft())
            self.worker_asks_for_groups(worker, self.groups_per_step)
            while worker.generating:
                group, started = worker.generating.pop(0)
                versions = [[started, worker.version]] * group.group_size
                rewards = [REWARDS[i % 2] for i in range(group.group_size)]
                self.deliver(worker, group.group_id, encode_group(finished_group(group, versions, rewards)), "queued")
            self.books_balance()
        while self.queue.depth:
            self.learner_takes()
            self.books_balance()


ActorLearnerLoop.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
test_actor_learner_loop = ActorLearnerLoop.TestCase
