"""Padding layout, token-budget micro-batches, the staleness rule and the conservation ledger."""

import pytest

from areal_async.actor_system.ledger import Ledger, ShardCounts
from areal_async.packing import pad_prompt_output_batch
from areal_async.actor_system.staleness import is_too_stale, may_admit


def test_padded_batch_aligns_outputs_with_next_token_positions():
    batch = pad_prompt_output_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_token_id=0,
                                    per_token={"lp": [[-0.5, -0.6], [-0.7, -0.8, -0.9]]})
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch.valid.tolist() == [[True] * 5, [True, True, True, True, False]]
    # position t predicts token t+1: outputs of row 0 are predicted at positions 2, 3
    assert batch.output_mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert batch.values["lp"][0].tolist() == pytest.approx([0, 0, -0.5, -0.6])
    assert batch.values["lp"][1].tolist() == pytest.approx([-0.7, -0.8, -0.9, 0])
    assert batch.num_output_tokens == 5


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="sequence 0 has an empty prompt"):
        pad_prompt_output_batch([[]], [[1]], pad_token_id=0)


def test_staleness_rule():
    # synchronous: exactly one step's groups per version
    assert may_admit(3, current_version=0, max_staleness=0, groups_per_step=4)
    assert not may_admit(4, current_version=0, max_staleness=0, groups_per_step=4)
    assert may_admit(4, current_version=1, max_staleness=0, groups_per_step=4)
    assert may_admit(11, current_version=0, max_staleness=2, groups_per_step=4)
    assert not may_admit(12, current_version=0, max_staleness=2, groups_per_step=4)
    assert may_admit(10**9, current_version=0, max_staleness=None, groups_per_step=4)
    assert not is_too_stale(oldest_token_version=3, training_step=5, max_staleness=2)
    assert is_too_stale(oldest_token_version=2, training_step=5, max_staleness=2)
    assert not is_too_stale(0, 100, None)


def test_admission_counts_a_group_in_flight_at_the_keep_rate():
    # window 4; a quarter of recent groups kept: 1 kept + 12 in flight expect 1 + 3 = 4 slots, full
    assert may_admit(12, current_version=0, max_staleness=0, groups_per_step=4, in_flight=12, keep_rate=0.25)
    assert not may_admit(13, current_version=0, max_staleness=0, groups_per_step=4, in_flight=12, keep_rate=0.25)
    # every group kept: the plain rule, in flight or not
    assert not may_admit(4, current_version=0, max_staleness=0, groups_per_step=4, in_flight=4, keep_rate=1.0)


def test_controller_oversamples_by_the_recent_keep_rate():
    from areal_async.actor_system.controller import RolloutController
    from areal_async.data.records import PromptRecord

    records = [PromptRecord(f"q{i}", "p", ("1",)) for i in range(100)]

    def controller(max_oversample):
        return RolloutController(records, lambda text: [1], group_size=2, groups_per_step=4, max_staleness=0, seed=0,
                                 max_oversample=max_oversample)

    def admit_all(c):
        groups = []
        while (group := c.admit(current_version=0)) is not None:
            groups.append(group)
        return groups

    plain, oversampling = controller(1.0), controller(4.0)
    for c in (plain, oversampling):
        assert len(admit_all(c)) == 4 and c.oversample == 1.0  # nothing delivered yet: the plain window
    for c in (plain, oversampling):
        for group in list(c.in_flight_groups()):
            c.delivered(group.group_id, dropped=True)  # all four dropped on arrival (zero variance)
    # keep rate (3/4)^4 = 0.316 after four drops at a step of 4 groups: 1 / 0.316 = 3.16 groups per slot
    assert oversampling.keep_rate == pytest.approx(0.75**4)
    assert len(admit_all(plain)) == 4
    assert len(admit_all(oversampling)) == 13  # 12 in flight expect 3.8 < 4 slots: a 13th; 13 expect 4.1
    restored = controller(4.0)
    restored.load_state_dict(oversampling.state_dict())
    assert restored.keep_rate == oversampling.keep_rate


def test_ledger_combines_owners_counts_and_refuses_impossible_moves():
    shard_a, shard_b = ShardCounts(), ShardCounts()
    for outcome in ("queued", "queued", "zero_variance"):
        shard_a.receive(outcome)
    shard_b.receive("bad_frame")
    shard_b.receive("queued")
    shard_a.consume(1)
    shard_b.drop_queued("stale")
    ledger = Ledger.combine(produced=7, in_flight=2, shards=[shard_a, shard_b])
    assert ledger.balanced
    assert ledger.totals() == {
        "produced": 7, "consumed": 1, "queued": 1, "in_flight": 2,
        "dropped": {"stale": 1, "zero_variance": 1, "bad_frame": 1, "generation_error": 0, "shutdown": 0},
    }
    # a delivered group that no shard received breaks conservation
    assert not Ledger.combine(produced=7, in_flight=1, shards=[shard_a, shard_b]).balanced
    with pytest.raises(RuntimeError, match="out of the queue"):
        shard_a.consume(2)
    with pytest.raises(ValueError, match="unknown drop reason"):
        shard_a.receive("bored")
