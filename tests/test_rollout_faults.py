"""Bad input in the rollout path: an engine that raises loses no group; a bad frame is counted, not fatal."""

import numpy as np

from areal_async.types import Generation
from actors.rollout import RolloutWorker
from areal_async.config import GenerationConfig
from areal_async.actor_system.controller import RolloutController
from areal_async.data.records import PromptRecord
from areal_async.actor_system.ledger import Ledger
from areal_async.actor_system.replay_queue import ShardedReplayQueue
from areal_async.reward import Verdict
from areal_async.actor_system.runtime import ControllerService


class FlakyEngine:
    """Raises on the first `failures` calls, then answers "\\boxed{<row>}" so rewards differ within a group."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.version = 0

    def generate(self, prompts, params, weight_update=None, max_new_tokens=None):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [Generation([row % 2], [-0.5], [self.version], "stop") for row in range(len(prompts))]


class CountingVerifier:
    correct_reward, incorrect_reward = 5.0, -5.0

    def verify_batch(self, responses, gold_answers):
        return [Verdict(response == "1") for response in responses]


def _system(failures: int, max_repeated_errors: int = 3):
    records = [PromptRecord(f"q{i}", f"prompt {i}", ("1",)) for i in range(10)]
    controller = ControllerService(
        RolloutController(records, lambda text: [1, 2, 3], group_size=2, groups_per_step=2, max_staleness=0, seed=0),
        max_generation_attempts=3, max_repeated_errors=max_repeated_errors,
    )
    queue = ShardedReplayQueue(num_shards=2, capacity_per_shard=8, max_staleness=0)
    worker = RolloutWorker(FlakyEngine(failures), lambda tokens: str(tokens[0]), CountingVerifier(), [7])
    return controller, queue, worker


def _ledger(controller, queue) -> Ledger:
    counts = controller.counts()
    return Ledger.combine(counts["produced"], counts["in_flight"], queue.shard_counts(), counts["controller_dropped"])


def test_failed_generation_is_readmitted_and_counted():
    controller, queue, worker = _system(failures=1)
    first = worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    assert first["errors"] == 1 and queue.depth == 0
    assert controller.counts()["in_flight"] == 2 and _ledger(controller, queue).balanced
    second = worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    assert second["groups"] == 2 and queue.depth == 2
    groups, _ = queue.take(2, training_step=0)
    assert sorted(g[0].group_id for g in groups) == ["g0", "g1"]  # the same groups, not new ones
    counts = controller.counts()
    assert counts["readmitted"] == 2 and counts["generation_errors"] == 1 and counts["produced"] == 2
    assert _ledger(controller, queue).balanced


def test_group_that_keeps_failing_is_dropped_and_frees_its_slot():
    controller, queue, worker = _system(failures=3)
    for _ in range(3):
        assert worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)["errors"] == 1
    ledger = _ledger(controller, queue)
    assert ledger.dropped["generation_error"] == 2 and ledger.in_flight == 0 and ledger.balanced
    result = worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    assert result["groups"] == 2  # the freed slots admit new prompts
    assert _ledger(controller, queue).balanced


def test_corrupt_frame_is_counted_and_queue_keeps_serving():
    controller, queue, worker = _system(failures=0)
    assert queue.put("g9", b"\x93not a frame") == "bad_frame"
    worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    groups, _ = queue.take(2, training_step=0)
    assert len(groups) == 2
    assert sum(c.dropped["bad_frame"] for c in queue.shard_counts()) == 1
    assert all(isinstance(t.output_tokens, np.ndarray) for g in groups for t in g)


def test_an_error_that_keeps_repeating_is_fatal_with_its_traceback():
    controller, queue, worker = _system(failures=5, max_repeated_errors=3)
    for _ in range(2):
        worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    assert controller.fatal_error() is None
    worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    fatal = controller.fatal_error()
    assert fatal["repeated"] == 3 and "illegal memory access" in fatal["reason"]
    assert "Traceback" in fatal["traceback"] and "in generate" in fatal["traceback"]
    assert [error["index"] for error in controller.errors_since(1)] == [1, 2]


def test_a_delivery_resets_the_repetition_count():
    controller, queue, worker = _system(failures=2, max_repeated_errors=3)
    for _ in range(3):
        worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    assert controller.counts()["generation_errors"] == 2 and controller.fatal_error() is None
    assert controller.repeated == 0


class SnapshotAfterEveryCall:
    """The controller service as a run checkpoint sees it: a snapshot may fall between any two of a worker's
    calls. Records, after every call, whether the admission slots agree with the groups the queue dropped."""

    def __init__(self, service: ControllerService, queue: ShardedReplayQueue) -> None:
        self.service, self.queue, self.disagreements = service, queue, []

    def __getattr__(self, name):
        method = getattr(self.service, name)

        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            controller = self.service.controller
            queue_drops = sum(sum(counts.dropped.values()) for counts in self.queue.shard_counts())
            expected = controller.produced - sum(controller.dropped.values()) - queue_drops
            if controller.occupied_slots != expected:
                self.disagreements.append((name, controller.occupied_slots, expected))
            return result

        return call


def test_a_dropped_group_frees_its_slot_in_the_same_call_as_its_delivery():
    """A snapshot between "delivered" and "slot freed" would shrink admission for good after a resume."""
    records = [PromptRecord(f"q{i}", f"prompt {i}", ("1",)) for i in range(10)]
    service = ControllerService(RolloutController(records, lambda text: [1, 2, 3], group_size=2, groups_per_step=2,
                                                  max_staleness=0, seed=0))
    queue = ShardedReplayQueue(num_shards=2, capacity_per_shard=8, max_staleness=0, filter_zero_variance=True)
    worker = RolloutWorker(FlakyEngine(0), lambda tokens: "1", CountingVerifier(), [7])  # every sample correct
    controller = SnapshotAfterEveryCall(service, queue)
    result = worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0)
    assert result["groups"] == 2 and sum(c.dropped["zero_variance"] for c in queue.shard_counts()) == 2
    assert controller.disagreements == []
    assert service.controller.occupied_slots == 0


def test_a_group_admitted_at_a_newer_version_is_generated_with_it():
    """With max_staleness 0, groups admitted for version v sampled with v - 1 would all be dropped as stale."""
    controller, queue, worker = _system(failures=0)
    controller.set_version(1)
    engine = worker.engine
    generated_at = []
    generate = engine.generate
    engine.generate = lambda *args, **kwargs: generated_at.append(engine.version) or generate(*args, **kwargs)

    def throttled_update(force: bool = False) -> bool:  # an idle worker's poll is throttled unless forced
        if not force:
            return False
        engine.version = 1
        return True

    worker.produce(controller, queue, GenerationConfig(), max_groups=2, seed=0, weight_update=throttled_update)
    assert generated_at == [1]
    groups, stale = queue.take(2, training_step=1)
    assert len(groups) == 2 and stale == 0


def test_a_dead_workers_groups_are_delivered_if_the_queue_got_them_else_handed_out_again():
    controller, queue, worker = _system(failures=0)
    controller.set_version(1)  # room for (1 + 0 + 1) x 2 = 4 groups
    mine = controller.admit_groups(3, worker=7)
    theirs = controller.admit_groups(1, worker=8)
    assert len(mine) == 3 and len(theirs) == 1
    # worker 7 put its first group (queued) and its second (dropped on arrival) but died before telling anyone
    receipts = {mine[0].group_id: "queued", mine[1].group_id: "zero_variance"}
    assert controller.release_worker(7, receipts) == {"delivered": 2, "readmitted": 1}
    counts = controller.counts()
    assert counts["in_flight"] == 2 and counts["readmitted_by_reason"] == {"worker_died": 1}
    assert controller.controller.occupied_slots == 3  # the dropped group gave its slot back
    again = controller.admit_groups(4, worker=9)
    assert [g.group_id for g in again] == [mine[2].group_id, "g4"]  # handed out again first, then the freed slot
    assert controller.release_worker(7, {}) == {"delivered": 0, "readmitted": 0}
    assert controller.holders == {theirs[0].group_id: 8, mine[2].group_id: 9, "g4": 9}


class TimingOutVerifier(CountingVerifier):
    """Judges "1" right and "0" wrong, except that checking the second sample of every group times out and an
    unreadable answer is "unparsed" (wrong, not unknown)."""

    def verify_batch(self, responses, gold_answers):
        verdicts = super().verify_batch(responses, gold_answers)
        return [Verdict(False, "timeout") if row % 3 == 1 else Verdict(False, "unparsed") if row % 3 == 2 else v
                for row, v in enumerate(verdicts)]


def test_an_answer_the_verifier_could_not_judge_gets_no_reward_and_the_rest_keep_theirs():
    worker = RolloutWorker(FlakyEngine(0), lambda tokens: str(tokens[0]), TimingOutVerifier(), [7])
    controller = RolloutController([PromptRecord("q0", "p", ("1",))], lambda text: [1, 2, 3], group_size=6,
                                   groups_per_step=1, max_staleness=0, seed=0)
    trajectories = worker.rollout([controller.admit(current_version=0)], GenerationConfig(group_size=6), seed=0)
    rewards = [t.reward for t in trajectories]
    assert [np.isnan(r) for r in rewards] == [False, True, False] * 2  # samples 1 and 4 timed out
    # the engine answers "1" (right) on odd rows; the unparsed samples (2, 5) count as wrong
    assert [rewards[i] for i in (0, 2, 3, 5)] == [-5.0, -5.0, 5.0, -5.0]
    assert worker.last_round["reward_failures"] == {"timeout": 2, "unparsed": 2}

