"""The engine's host-side scheduling without a model: chunking, slot buckets, admission, harvest, compaction."""

from actors.scheduler import Schedule, padded_chunks, slot_bucket


def test_padded_chunks_keep_count_times_longest_within_the_budget():
    assert padded_chunks([3, 5, 2, 4], 10) == [(0, 2, 5), (2, 4, 4)]  # 2 x 5 = 10; 3 x 5 would be 15
    assert padded_chunks([12, 1, 1], 10) == [(0, 1, 12), (1, 3, 1)]  # a long item alone, even over the budget
    assert padded_chunks([2, 2, 2, 2, 2], 10) == [(0, 5, 2)]
    assert padded_chunks([], 10) == []


def test_slot_buckets_are_powers_of_two_from_two_up_to_the_slot_count():
    assert [slot_bucket(highest, 12) for highest in (0, 1, 2, 3, 4, 7, 8, 11)] == [2, 2, 4, 4, 8, 8, 12, 12]


def test_requests_fill_the_lowest_free_slots_in_order_and_refill_waits_for_enough_free_slots():
    schedule = Schedule(prompt_lengths=[4, 5, 6, 7, 8], limits=[3, 3, 3, 3, 3], slots=2)
    assert schedule.wants_refill(refill_min=1)
    requests, slots = schedule.admit()
    assert (requests, slots) == ([0, 1], [0, 1])
    schedule.place(requests, slots, version=7)
    assert not schedule.wants_refill(refill_min=1)  # no free slot
    assert schedule.occupants[1].prompt_len == 5 and schedule.occupants[1].first_version == 7
    assert schedule.steps_to_run(sync_every=8) == 2  # limit 3: the first token comes from prefill
    schedule.record_step(7)
    schedule.record_step(8)
    assert schedule.longest_bound() == 5 + 2
    epoch = schedule.snapshot()
    done = schedule.finished(epoch, [3, -1])  # slot 0 finished with 3 tokens, slot 1 still running
    assert [(slot, request.index, tokens) for slot, request, tokens in done] == [(0, 0, 3)]
    assert schedule.versions(done[0][1], 3) == [7, 7, 8]
    assert schedule.free == [0]
    assert schedule.wants_refill(refill_min=1) and not schedule.wants_refill(refill_min=2)
    assert schedule.admit() == ([2], [0])


def test_a_snapshot_queued_before_a_request_took_its_slot_does_not_judge_it():
    schedule = Schedule([4, 4, 4], [5, 5, 5], slots=2)
    schedule.place(*schedule.admit(), version=0)
    early = schedule.snapshot()  # queued while requests 0 and 1 ran
    schedule.finished(schedule.snapshot(), [2, -1])  # a later one frees slot 0
    schedule.place(*schedule.admit(), version=1)  # request 2 takes slot 0
    assert schedule.finished(early, [2, -1]) == []  # the early snapshot describes request 0, not 2
    assert schedule.running


def test_compaction_moves_the_tail_below_the_bucket_its_count_needs():
    schedule = Schedule([1] * 8, [9] * 8, slots=8)
    schedule.place(*schedule.admit(), version=0)
    schedule.finished(schedule.snapshot(), [0, 0, -1, 0, 0, -1, 0, -1])  # slots 2, 5, 7 still run
    assert schedule.compaction() == [(5, 0), (7, 1)]  # three sequences fit the bucket of 4 slots: 0..3
    moved = schedule.occupants[7]
    schedule.move([(5, 0), (7, 1)])
    assert sorted(schedule.occupants) == [0, 1, 2] and schedule.occupants[1] is moved
    assert moved.placed == schedule.epoch
    assert schedule.free == [3, 4, 5, 6, 7]
    assert schedule.compaction() == []  # already within the bucket


def test_no_compaction_while_requests_wait():
    schedule = Schedule([1] * 5, [9] * 5, slots=4)
    schedule.place(*schedule.admit(), version=0)
    schedule.finished(schedule.snapshot(), [0, 0, 0, -1])
    assert schedule.pending and schedule.compaction() == []
