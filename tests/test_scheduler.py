"""The engine's host-side scheduling without a model: chunking, slot buckets, the block pool, admission with shared
prompt blocks, growth, preemption, harvest and compaction."""

import pytest

from actors.scheduler import BlockPool, Schedule, padded_chunks
from areal_async.model.decode_batch import decode_batch_size, decode_batch_sizes


def schedule_of(prompt_lengths, limits, slots, block_size=4, blocks=64, keys=None) -> Schedule:
    return Schedule(prompt_lengths, limits, slots, block_size, BlockPool(blocks), keys)


def place_all(schedule: Schedule, version: int = 0):
    admissions = schedule.admit()
    for admission in admissions:
        schedule.place(admission, version)
    return admissions


def test_padded_chunks_keep_count_times_longest_within_the_budget():
    assert padded_chunks([3, 5, 2, 4], 10) == [(0, 2, 5), (2, 4, 4)]  # 2 x 5 = 10; 3 x 5 would be 15
    assert padded_chunks([12, 1, 1], 10) == [(0, 1, 12), (1, 3, 1)]  # a long item alone, even over the budget
    assert padded_chunks([2, 2, 2, 2, 2], 10) == [(0, 5, 2)]
    assert padded_chunks([], 10) == []


def test_decode_batch_sizes_are_powers_of_two_to_8_then_four_per_octave():
    assert [decode_batch_size(count, 1024) for count in (1, 2, 3, 5, 8, 9, 11, 17, 100, 129, 257, 1000)] == [
        2, 2, 4, 8, 8, 10, 12, 20, 112, 160, 320, 1024]
    assert [decode_batch_size(count, 12) for count in (1, 4, 9, 12)] == [2, 4, 10, 12]  # capped at the slots
    assert decode_batch_sizes(64) == [2, 4, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    for count in range(9, 1025):  # never more than a quarter of the rows wasted above 8
        assert count <= decode_batch_size(count, 1024) < 1.25 * count


def test_block_pool_hands_out_the_lowest_ids_and_frees_a_shared_block_with_its_last_holder():
    pool = BlockPool(6)  # block 0 is the null block: 5 to hand out
    assert pool.available == 5 and pool.take(2) == [1, 2]
    pool.share([1])
    assert pool.freed_by([[1, 2]]) == 1  # block 1 has a second holder
    assert pool.freed_by([[1, 2], [1]]) == 2  # unless both holders let go
    pool.release([1, 2])
    assert pool.available == 4 and pool.in_use == 1
    pool.release([1])
    assert pool.available == 5 and pool.peak_in_use == 2
    with pytest.raises(RuntimeError, match="5 free blocks, 6 asked"):
        pool.take(6)


def test_requests_fill_the_lowest_free_slots_in_order_and_refill_waits_for_enough_free_slots():
    schedule = schedule_of(prompt_lengths=[4, 5, 6, 7, 8], limits=[3, 3, 3, 3, 3], slots=2)
    assert schedule.wants_refill(refill_min=1)
    (first, second) = place_all(schedule, version=7)
    assert (first.requests, first.slots, second.requests, second.slots) == ([0], [0], [1], [1])
    assert first.own == [[1]] and second.own == [[2, 3]]  # 4 tokens fill one block of 4, 5 tokens take two
    assert not schedule.wants_refill(refill_min=1)  # no free slot
    assert schedule.occupants[1].prompt_len == 5 and schedule.occupants[1].first_version == 7
    assert schedule.steps_to_run(sync_every=8) == 2  # limit 3: the first token comes from prefill
    schedule.record_step(7)
    schedule.record_step(8)
    epoch = schedule.snapshot()
    done = schedule.finished(epoch, [3, -1])  # slot 0 finished with 3 tokens, slot 1 still running
    assert [(slot, request.index, tokens) for slot, request, tokens in done] == [(0, 0, 3)]
    assert schedule.versions(done[0][1], 3) == [7, 7, 8]
    assert schedule.free == [0] and schedule.pool.available == 63 - 2  # request 0's block came back
    assert schedule.wants_refill(refill_min=1) and not schedule.wants_refill(refill_min=2)
    (third,) = schedule.admit()
    assert (third.requests, third.slots) == ([2], [0])


def test_a_snapshot_queued_before_a_request_took_its_slot_does_not_judge_it():
    schedule = schedule_of([4, 4, 4], [5, 5, 5], slots=2)
    place_all(schedule)
    early = schedule.snapshot()  # queued while requests 0 and 1 ran
    schedule.finished(schedule.snapshot(), [2, -1])  # a later one frees slot 0
    place_all(schedule, version=1)  # request 2 takes slot 0
    assert schedule.finished(early, [2, -1]) == []  # the early snapshot describes request 0, not 2
    assert schedule.running


def test_samples_of_one_prompt_share_its_full_blocks_and_copy_its_partial_one():
    keys = ["a", "a", "a", "b", "b"]
    schedule = schedule_of([10, 10, 10, 8, 8], [5] * 5, slots=5, keys=keys)
    first, second = place_all(schedule)
    # 10 tokens: two full blocks shared by the three samples, a partial third block each
    assert first.requests == [0, 1, 2] and first.shared == [1, 2] and first.own == [[3], [4], [5]]
    assert first.table(2) == [1, 2, 5] and schedule.occupants[2].shared == 2
    # 8 tokens fill two blocks exactly: nothing of their own until they grow
    assert second.requests == [3, 4] and second.shared == [6, 7] and second.own == [[], []]
    assert schedule.shared_blocks == 2 * 2 + 2 * 1
    assert schedule.pool.in_use == 7
    # a sample that ends releases only its own block; the shared ones stay with its group
    schedule.record_step(0)
    schedule.finished(schedule.snapshot(), [2, -1, -1, -1, -1])
    assert schedule.pool.in_use == 6


def test_blocks_grow_with_the_length_a_run_can_reach():
    schedule = schedule_of([4, 6], [20, 3], slots=2)
    place_all(schedule)
    assert schedule.occupants[0].blocks == [1] and schedule.occupants[1].blocks == [2, 3]
    # after 6 steps request 0 may hold 4 + 6 tokens (3 blocks); request 1 stops at 6 + 2 (its 2 blocks)
    assert schedule.victims(6) == []
    assert schedule.grow(6) == [(0, 1, 4), (0, 2, 5)]
    assert schedule.occupants[0].blocks == [1, 4, 5] and schedule.occupants[1].blocks == [2, 3]
    assert schedule.grow(6) == []  # already covered


def test_the_youngest_sequence_is_preempted_and_resumes_first_with_what_it_generated():
    schedule = schedule_of([4, 4, 4], [30, 30, 30], slots=3, blocks=7)  # 6 blocks to hand out
    place_all(schedule)
    assert [schedule.occupants[slot].blocks for slot in range(3)] == [[1], [2], [3]]
    for _ in range(4):
        schedule.record_step(0)
    # 4 more steps: each may hold 4 + 8 = 12 tokens = 3 blocks, 6 more for 3 free: the youngest goes
    assert schedule.victims(4) == [2]
    schedule.preempt(2, tokens=[7, 8, 9, 10, 11], logprobs=[-1.0] * 5)
    assert schedule.preemptions == 1 and schedule.pending == [2] and schedule.free == [2]
    assert schedule.resumed[2].versions == [0] * 5
    assert schedule.victims(4) == []
    schedule.grow(4)
    assert schedule.pool.available == 0
    schedule.finished(schedule.snapshot(), [-1, 12, -1])  # request 1 finishes: 3 blocks back
    # prompt + 5 tokens = 9 tokens, 3 blocks, and 2 of headroom (for itself and request 0): it waits
    assert schedule.admit() == []
    schedule.finished(schedule.snapshot(), [13, -1, -1])
    (resumed,) = schedule.admit()
    assert resumed.requests == [2] and resumed.slots == [0] and resumed.prefill_len == 9
    assert len(resumed.own[0]) == 3
    schedule.place(resumed, version=1)
    request = schedule.occupants[0]
    assert request.limit == 25 and request.generated_before == 5 and request.length_bound(schedule.steps) == 9
    schedule.record_step(1)
    assert schedule.versions(request, 7) == [0, 0, 0, 0, 0, 1, 1]


def test_admission_keeps_free_what_the_running_sequences_grow_into_in_one_run():
    schedule = schedule_of([4, 4, 4], [9, 9, 9], slots=3, blocks=6)  # 5 blocks
    admissions = place_all(schedule)
    # each takes 1 block and can grow into 1 more in a run: 1 + 1 of 5, 1 + 2 of 4, then 1 + 3 > 3
    assert [a.requests for a in admissions] == [[0], [1]]
    assert schedule.pending == [2]
    # runs of 8 steps over blocks of 4: a sequence can cross 2 blocks in one, so only one fits now
    long_runs = Schedule([4, 4, 4], [9, 9, 9], 3, 4, BlockPool(6), run_tokens=8)
    assert [a.requests for a in long_runs.admit()] == [[0]]
    # nothing running: a request that fits only without room to grow is still admitted
    tight = schedule_of([8], [9], slots=1, blocks=3)
    assert [a.requests for a in tight.admit()] == [[0]]


def test_preempting_every_sample_of_a_prompt_frees_its_shared_blocks():
    # request 0 (2 tokens) is the oldest; requests 1 and 2 share a prompt of 8 tokens (4 shared blocks of 2)
    schedule = schedule_of([2, 8, 8], [14, 8, 8], slots=3, block_size=2, blocks=9, keys=["a", "b", "b"])
    first, group = place_all(schedule)
    assert first.requests == [0] and group.requests == [1, 2] and len(group.shared) == 4
    assert schedule.pool.available == 3
    # 8 steps: request 0 may reach 2 + 8 = 10 tokens (4 more blocks), each sample 8 + 7 (4 more each): only
    # preempting both samples, whose shared blocks then come back, makes room for the oldest
    for _ in range(8):
        schedule.record_step(0)
    assert sorted(schedule.victims(8)) == [1, 2]


def test_a_request_the_whole_pool_cannot_hold_fails_with_the_numbers():
    schedule = schedule_of([40], [4], slots=1, blocks=6)
    with pytest.raises(ValueError, match=r"KV pool \(5 blocks of 4 tokens\) cannot hold a sequence of 40 tokens"):
        schedule.admit()
    lone = schedule_of([4], [40], slots=1, blocks=6)
    place_all(lone)
    with pytest.raises(RuntimeError, match="cannot hold one sequence of 24 tokens"):
        lone.victims(20)


def test_compaction_moves_the_tail_below_the_bucket_its_count_needs():
    schedule = schedule_of([1] * 8, [9] * 8, slots=8)
    place_all(schedule)
    schedule.finished(schedule.snapshot(), [0, 0, -1, 0, 0, -1, 0, -1])  # slots 2, 5, 7 still run
    assert schedule.compaction() == [(5, 0), (7, 1)]  # three sequences fit the batch of 4 slots: 0..3
    moved = schedule.occupants[7]
    schedule.move([(5, 0), (7, 1)])
    assert sorted(schedule.occupants) == [0, 1, 2] and schedule.occupants[1] is moved
    assert moved.placed == schedule.epoch
    assert schedule.free == [3, 4, 5, 6, 7]
    assert schedule.compaction() == []  # already within the bucket


def test_no_compaction_while_requests_wait():
    schedule = schedule_of([1] * 5, [9] * 5, slots=4)
    place_all(schedule)
    schedule.finished(schedule.snapshot(), [0, 0, 0, -1])
    assert schedule.pending and schedule.compaction() == []
