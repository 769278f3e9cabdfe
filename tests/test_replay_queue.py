"""The sharded replay queue: FIFO, backpressure, counted drops, staleness at take, fairness, the zarr log."""

import binascii
import json
import logging

import numpy as np
import pytest
import zarr

from areal_async.actor_system.ledger import DROP_REASONS
from areal_async.actor_system.replay_queue import (
    ReplayQueueShard,
    ShardedReplayQueue,
    group_oldest_version,
    round_robin_quotas,
    shard_for,
)
from areal_async.actor_system.trajectory_log import TrajectoryLog, read_trajectory_log
from areal_async.types import Trajectory
from areal_async.actor_system.wire import encode_group


def make_group(group_id, versions=((0, 0), (0, 1)), rewards=(5.0, -5.0)):
    """One trajectory per entry of `versions` (the per-token versions of its output)."""
    return [
        Trajectory(
            query_id=f"q-{group_id}",
            group_id=group_id,
            sample_index=index,
            prompt_tokens=np.array([1, 2, 3], dtype=np.int32),
            output_tokens=np.arange(len(token_versions), dtype=np.int32) + 10 * index,
            behaviour_logprobs=np.full(len(token_versions), -0.5 - index, dtype=np.float32),
            versions=np.array(token_versions, dtype=np.int32),
            reward=reward,
            finish_reason="stop",
            timings={"generate_s": 0.25 * index},
        )
        for index, (token_versions, reward) in enumerate(zip(versions, rewards))
    ]


def frame(group_id, **kwargs) -> bytes:
    return encode_group(make_group(group_id, **kwargs))


def ids(groups) -> list[str]:
    return [group[0].group_id for group in groups]


# ---------------------------------------------------------------------------------------------- one shard


def test_shard_is_fifo_and_counts_consumed():
    shard = ReplayQueueShard(0, capacity_groups=8, max_staleness=None)
    for name in "abcde":
        assert shard.put(frame(name)) == "queued"
    groups, stale = shard.take(3, training_step=0)
    assert (ids(groups), stale) == (["a", "b", "c"], 0)
    assert ids(shard.take(10, training_step=0)[0]) == ["d", "e"]
    assert shard.take(1, training_step=0) == ([], 0)
    assert (shard.counts.received, shard.counts.consumed, shard.counts.queued) == (5, 5, 0)


def test_taken_groups_are_decoded_intact():
    shard = ReplayQueueShard(0, capacity_groups=1, max_staleness=None)
    shard.put(frame("a"))
    (group,), _ = shard.take(1, training_step=0)
    expected = make_group("a")
    assert [t.sample_index for t in group] == [0, 1]
    assert all(np.array_equal(t.versions, e.versions) and t.reward == e.reward for t, e in zip(group, expected))


def test_full_shard_refuses_without_counting_and_accepts_after_a_take():
    shard = ReplayQueueShard(0, capacity_groups=2, max_staleness=None)
    assert [shard.put(frame(name)) for name in "ab"] == ["queued", "queued"]
    assert shard.put(frame("c")) == "full"
    assert shard.put(b"garbage") == "full"  # a full shard does not even look at the frame
    assert shard.counts.received == 2 and shard.depth == 2
    shard.take(1, training_step=0)
    assert shard.put(frame("c")) == "queued"
    assert ids(shard.take(5, training_step=0)[0]) == ["b", "c"]


def test_bad_frame_is_counted_logged_and_the_shard_keeps_working(caplog):
    shard = ReplayQueueShard(3, capacity_groups=4, max_staleness=None)
    good = frame("a")
    with caplog.at_level(logging.WARNING, logger="areal_async.actor_system.replay_queue"):
        assert shard.put(good[:-2]) == "bad_frame"
        assert shard.put(b"\x93\x01") == "bad_frame"
    assert "shard 3 dropped a bad frame" in caplog.text
    assert shard.put(good) == "queued"
    assert shard.counts.dropped["bad_frame"] == 2 and shard.counts.received == 3 and shard.depth == 1
    stats = shard.stats()
    assert len(stats["last_errors"]) == 2 and "msgpack" in stats["last_errors"][0]
    assert ids(shard.take(1, training_step=0)[0]) == ["a"]


def test_last_errors_keeps_only_the_latest_messages():
    shard = ReplayQueueShard(0, capacity_groups=1, max_staleness=None)
    for _ in range(20):
        shard.put(b"")
    assert shard.counts.dropped["bad_frame"] == 20 and len(shard.last_errors) == 8


def test_zero_variance_group_is_dropped_unless_the_filter_is_off():
    shard = ReplayQueueShard(0, capacity_groups=4, max_staleness=None)
    assert shard.put(frame("same", rewards=(5.0, 5.0))) == "zero_variance"
    assert shard.put(frame("one", versions=((0,),), rewards=(-5.0,))) == "zero_variance"  # G = 1
    assert shard.put(frame("mixed", rewards=(5.0, -5.0))) == "queued"
    assert shard.counts.dropped["zero_variance"] == 2 and shard.depth == 1
    unfiltered = ReplayQueueShard(0, capacity_groups=4, max_staleness=None, filter_zero_variance=False)
    assert unfiltered.put(frame("same", rewards=(5.0, 5.0))) == "queued"
    # an answer the verifier could not judge (NaN) does not count: one scored sample left is zero variance
    nan = float("nan")
    versions = ((0,), (0,), (0,))
    assert shard.put(frame("nan", versions=versions, rewards=(5.0, nan, -5.0))) == "queued"
    assert shard.put(frame("nan one", versions=versions, rewards=(5.0, nan, nan))) == "zero_variance"


def test_oldest_version_ignores_empty_outputs_and_is_minus_one_for_an_empty_group():
    assert group_oldest_version(make_group("g", versions=((3, 4), (), (2, 5)), rewards=(1, 2, 3))) == 2
    assert group_oldest_version(make_group("g", versions=((), ()))) == -1


def test_stale_groups_are_dropped_at_take_and_do_not_count_toward_max_groups():
    shard = ReplayQueueShard(0, capacity_groups=8, max_staleness=1)
    shard.put(frame("old", versions=((3, 4), (1, 4))))  # oldest token: version 1
    shard.put(frame("fresh", versions=((3, 3), (4, 5))))  # oldest 3
    shard.put(frame("older", versions=((0,), (5,))))  # oldest 0
    shard.put(frame("edge", versions=((2, 2), (2, 3))))  # oldest 2 = 3 - 1: still allowed at step 3
    shard.put(frame("empty", versions=((), ())))  # no tokens at all: version -1
    groups, stale = shard.take(2, training_step=3)
    assert (ids(groups), stale) == (["fresh", "edge"], 2)
    assert shard.take(2, training_step=3) == ([], 1)
    counts = shard.counts
    assert (counts.consumed, counts.dropped["stale"], counts.queued, counts.received) == (2, 3, 0, 5)


def test_no_staleness_bound_takes_everything():
    shard = ReplayQueueShard(0, capacity_groups=4, max_staleness=None)
    shard.put(frame("empty", versions=((), ())))
    shard.put(frame("ancient", versions=((0,), (0,))))
    assert (ids(shard.take(5, training_step=10**6)[0])) == ["empty", "ancient"]


def test_drain_drops_everything_with_the_reason():
    shard = ReplayQueueShard(0, capacity_groups=4, max_staleness=None)
    for name in "abc":
        shard.put(frame(name))
    with pytest.raises(ValueError, match="unknown drop reason"):
        shard.drain("bored")
    assert shard.depth == 3 and shard.counts.queued == 3  # a refused drain moves nothing
    assert shard.drain() == 3
    assert shard.depth == 0 and shard.counts.dropped["shutdown"] == 3 and shard.counts.queued == 0
    assert shard.drain("generation_error") == 0


def test_stats_are_plain_json():
    shard = ReplayQueueShard(2, capacity_groups=4, max_staleness=0)
    shard.put(frame("a"))
    shard.put(b"x")
    stats = json.loads(json.dumps(shard.stats()))
    assert stats["shard_index"] == 2 and stats["depth"] == 1 and stats["capacity_groups"] == 4
    assert stats["received"] == 2 and stats["queued"] == 1
    assert stats["dropped"] == {reason: int(reason == "bad_frame") for reason in DROP_REASONS}


# ---------------------------------------------------------------------------------------------- K shards


def test_shard_for_is_stable_across_processes():
    # crc32 values fixed once: a change here would route resumed groups to other shards
    assert [shard_for(f"g{i}", 4) for i in range(8)] == [3, 1, 3, 1, 2, 0, 2, 0]
    assert [shard_for(f"g{i}", 3) for i in range(8)] == [2, 1, 1, 0, 1, 2, 2, 0]
    assert shard_for("g123456", 7) == 0 and shard_for("g-ü", 5) == binascii.crc32("g-ü".encode()) % 5
    assert all(shard_for(f"x{i}", 1) == 0 for i in range(10))


def test_round_robin_quotas():
    assert round_robin_quotas([3, 3, 3], start=1, wanted=4) == ([1, 2, 1], 1)
    assert round_robin_quotas([0, 5, 1], start=2, wanted=4) == ([0, 3, 1], 1)
    assert round_robin_quotas([1, 0, 1], start=0, wanted=10) == ([1, 0, 1], 2)
    assert round_robin_quotas([0, 0], start=0, wanted=3) == ([0, 0], None)


def names_on_shards(num_shards, per_shard):
    """Group ids routed so that shard s gets per_shard groups named s0, s1, ... in order of arrival."""
    names = {shard: [] for shard in range(num_shards)}
    i = 0
    while any(len(found) < per_shard for found in names.values()):
        shard = shard_for(f"g{i}", num_shards)
        if len(names[shard]) < per_shard:
            names[shard].append(f"g{i}")
        i += 1
    return names


def test_sharded_queue_routes_by_shard_for_and_serves_shards_in_turn():
    queue = ShardedReplayQueue(num_shards=3, capacity_per_shard=4, max_staleness=None)
    names = names_on_shards(3, 3)
    for position in range(3):
        for shard in (2, 0, 1):
            assert queue.put(names[shard][position], frame(names[shard][position])) == "queued"
    assert [shard.depth for shard in queue.shards] == [3, 3, 3] and queue.depth == 9
    groups, stale = queue.take(2, training_step=0)
    assert (sorted(ids(groups)), stale) == (sorted([names[0][0], names[1][0]]), 0)
    # the next take starts after shard 1, the one served last
    assert sorted(ids(queue.take(2, training_step=0)[0])) == sorted([names[2][0], names[0][1]])
    expected = [names[1][1], names[2][1], names[0][2], names[1][2]]
    assert sorted(ids(queue.take(4, training_step=0)[0])) == sorted(expected)
    assert ids(queue.take(4, training_step=0)[0]) == [names[2][2]]
    assert queue.depth == 0 and sum(c.consumed for c in queue.shard_counts()) == 9


def test_sharded_take_skips_empty_shards_and_keeps_going_past_stale_drops():
    queue = ShardedReplayQueue(num_shards=2, capacity_per_shard=4, max_staleness=0)
    names = names_on_shards(2, 3)
    queue.put(names[0][0], frame(names[0][0], versions=((1,), (1,))))
    queue.put(names[0][1], frame(names[0][1], versions=((2,), (2,))))
    queue.put(names[1][0], frame(names[1][0], versions=((1,), (2,))))  # stale at step 2
    queue.put(names[1][1], frame(names[1][1], versions=((0,), (0,))))  # stale at step 2
    queue.put(names[1][2], frame(names[1][2], versions=((2,), (3,))))
    groups, stale = queue.take(2, training_step=2)
    assert (sorted(ids(groups)), stale) == (sorted([names[0][1], names[1][2]]), 3)
    assert queue.depth == 0
    counts = queue.shard_counts()
    assert [c.dropped["stale"] for c in counts] == [1, 2] and [c.consumed for c in counts] == [1, 1]


def test_sharded_put_full_and_drain():
    queue = ShardedReplayQueue(num_shards=2, capacity_per_shard=1, max_staleness=None)
    names = names_on_shards(2, 2)
    assert queue.put(names[0][0], frame(names[0][0])) == "queued"
    assert queue.put(names[0][1], frame(names[0][1])) == "full"
    assert queue.put(names[1][0], b"junk") == "bad_frame"
    assert queue.put(names[1][1], frame(names[1][1])) == "queued"
    assert queue.drain() == 2
    assert [dict(c.dropped) for c in queue.shard_counts()] == [{"shutdown": 1}, {"bad_frame": 1, "shutdown": 1}]


# ---------------------------------------------------------------------------------------------- zarr log


def assert_rows_equal(rows, expected):
    assert len(rows) == len(expected)
    for row, (trajectory, step) in zip(rows, expected):
        assert row["consumed_at_step"] == step
        for name in ("query_id", "group_id", "sample_index", "reward", "finish_reason", "timings"):
            assert row[name] == getattr(trajectory, name), name
        for name in ("prompt_tokens", "output_tokens", "behaviour_logprobs", "versions", "loss_mask"):
            assert row[name].dtype == getattr(trajectory, name).dtype, name
            assert np.array_equal(row[name], getattr(trajectory, name)), name


def test_trajectory_log_appends_reopens_and_reads_back_every_row(tmp_path):
    path = tmp_path / "log"
    first, second = make_group("a"), make_group("b", versions=((2, 2, 3), (), (4,)), rewards=(1.0, -1.0, 0.5))
    third = make_group("c", versions=((), ()))
    log = TrajectoryLog(path)
    log.append(first, consumed_at_step=0)
    log.append(second, consumed_at_step=1)
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append(third, consumed_at_step=2)
    resumed = TrajectoryLog(path)
    assert resumed.num_trajectories == 5
    resumed.append(third, consumed_at_step=2)
    rows = list(read_trajectory_log(path))
    assert_rows_equal(rows, [(t, 0) for t in first] + [(t, 1) for t in second] + [(t, 2) for t in third])


def test_trajectory_log_drops_a_torn_append_on_reopen(tmp_path):
    path = tmp_path / "log"
    log = TrajectoryLog(path)
    log.append(make_group("a"), consumed_at_step=0)
    # a crash in the middle of an append: data written, lengths not committed
    log._arrays["output_tokens"].resize((100,))
    log._arrays["reward"].resize((9,))
    resumed = TrajectoryLog(path)
    resumed.append(make_group("b"), consumed_at_step=1)
    expected = [(t, 0) for t in make_group("a")] + [(t, 1) for t in make_group("b")]
    assert_rows_equal(list(read_trajectory_log(path)), expected)


def test_a_log_written_before_loss_masks_reads_and_resumes_with_every_token_trained(tmp_path):
    path = tmp_path / "log"
    log = TrajectoryLog(path)
    log.append(make_group("a"), consumed_at_step=0)
    log.close()
    del zarr.open_group(str(path), mode="a")["loss_mask"]  # as an older version wrote it
    assert [row["loss_mask"].tolist() for row in read_trajectory_log(path)] == [[1] * len(t.output_tokens)
                                                                             for t in make_group("a")]
    resumed = TrajectoryLog(path)
    second = make_group("b")
    second[0].loss_mask[:] = 0
    resumed.append(second, consumed_at_step=1)
    assert_rows_equal(list(read_trajectory_log(path)), [(t, 0) for t in make_group("a")] + [(t, 1) for t in second])


def test_queue_logs_what_it_hands_out(tmp_path):
    queue = ShardedReplayQueue(num_shards=2, capacity_per_shard=4, max_staleness=0, log_dir=tmp_path)
    names = names_on_shards(2, 2)
    queue.put(names[0][0], frame(names[0][0], versions=((0,), (0,))))  # stale at step 1: not logged
    queue.put(names[1][0], frame(names[1][0], versions=((1,), (1,))))
    queue.put(names[0][1], frame(names[0][1], versions=((1,), (1,))))
    groups, stale = queue.take(2, training_step=1)
    assert len(groups) == 2 and stale == 1
    queue.close()
    logged = {
        shard: [(row["group_id"], row["consumed_at_step"]) for row in read_trajectory_log(tmp_path / f"shard-{shard}")]
        for shard in (0, 1)
    }
    assert logged == {0: [(names[0][1], 1)] * 2, 1: [(names[1][0], 1)] * 2}


# ------------------------------------------------------------------------------ checkpoint snapshots


def test_snapshot_reports_receipts_of_groups_the_controller_still_counts_in_flight():
    shard = ReplayQueueShard(0, capacity_groups=8, max_staleness=None, keep_receipts=True)
    assert shard.put(frame("a"), "a") == "queued"
    assert shard.put(frame("b", rewards=(5.0, 5.0)), "b") == "zero_variance"
    assert shard.put(b"junk", "c") == "bad_frame"
    # the controller's snapshot still counts b and c in flight (their receipts had not reached it); a was known
    state = shard.snapshot(in_flight_ids=["b", "c", "d"])
    assert state["receipts"] == {"b": "zero_variance", "c": "bad_frame"}
    assert len(state["frames"]) == 1
    # receipts the controller has since confirmed are forgotten; the unconfirmed ones stay until it has
    assert shard.snapshot(in_flight_ids=["c"])["receipts"] == {"c": "bad_frame"}
    assert shard.snapshot(in_flight_ids=[])["receipts"] == {}
    assert shard.snapshot(in_flight_ids=["c"])["receipts"] == {}


def test_snapshot_round_trips_queued_groups():
    shard = ReplayQueueShard(0, capacity_groups=8, max_staleness=None)
    for name in "ab":
        shard.put(frame(name), name)
    state = json.loads(json.dumps(shard.snapshot()))  # what a run checkpoint stores
    assert state["receipts"] == {}  # receipts are kept only when asked for
    restored = ReplayQueueShard(0, capacity_groups=8, max_staleness=None)
    restored.load_state_dict(state, resume_step=0)
    assert ids(restored.take(5, training_step=0)[0]) == ["a", "b"]
    assert restored.counts.received == 2


def test_settle_deliveries_counts_received_groups_as_delivered():
    from areal_async.actor_system.controller import settle_deliveries

    state = {"cursor": 10, "delivered_groups": 4, "freed_slots": 1, "readmitted": 0, "dropped": {},
             "in_flight": [{"group_id": f"g{i}"} for i in (5, 6, 7, 8)]}
    settled = settle_deliveries(state, {"g6": "queued", "g8": "zero_variance"})
    assert [entry["group_id"] for entry in settled["in_flight"]] == ["g5", "g7"]
    assert settled["delivered_groups"] == 6 and settled["freed_slots"] == 2  # the dropped one frees its slot
    assert settle_deliveries(state, {}) == state
    with pytest.raises(ValueError, match="receipts name groups"):
        settle_deliveries(state, {"g9": "queued"})


def test_room_is_what_the_fullest_shard_can_still_take():
    queue = ShardedReplayQueue(num_shards=2, capacity_per_shard=3, max_staleness=None)
    assert queue.room() == 3
    routed = {}
    for index in range(20):  # two groups of shard 0, none of shard 1
        routed.setdefault(shard_for(f"g{index}", 2), []).append(f"g{index}")
    for name in routed[0][:2]:
        assert queue.put(name, frame(name)) == "queued"
    assert queue.room() == 1 and queue.depth == 2
