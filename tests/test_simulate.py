"""The discrete-event model of `areal-async simulate` (areal_async/planning/simulate.py): the engine arithmetic, one
generate call and the whole system, on cases small enough to work out by hand."""

import random

import pytest

from areal_async.planning.simulate import (
    DecodeCost,
    EngineCall,
    EngineModel,
    LengthModel,
    Request,
    Simulation,
    SystemModel,
    call_seconds,
    growing_positions,
    notice_step,
    simulate,
    summarize,
)

STEP = DecodeCost(fixed_s=0.01, per_slot_s=0.0, per_kv_s=0.0, prefill_token_s=0.0)  # 10 ms a step, whatever runs
EVERY_STEP = EngineModel(slots=4, sync_every=1, lookahead=0)  # a finished slot frees at once


def system(**fields) -> SystemModel:
    """One worker, groups of 4 answers of 10 tokens after 5-token prompts, one group a step: a call is 9 decode
    steps (the prefill samples the first token) = 0.09 s; training 60 tokens at 60 tokens/s = 1 s."""
    values = dict(rollout_workers=1, learner_ranks=1, groups_per_step=1, group_size=4, groups_per_request=1,
                  max_staleness=0, prompt_tokens=5, lengths=LengthModel(mean=10, cap=10, sigma=0), engine=EVERY_STEP,
                  decode=STEP, train_tokens_per_s=60.0, weight_sync_s=0.5)
    return SystemModel(**{**values, **fields})


# ---------------------------------------------------------------------------------------------- engine arithmetic


def test_growing_positions_by_hand():
    # two sequences of prompts 5 and 8 started at steps 0 and 2 (offsets 5 - 0 + 8 - 2 = 11): at step s they
    # read (5 + s + 1) + (8 + s - 2 + 1) positions; steps 3, 4 and 5: 9 + 10 + 10 + 11 + 11 + 12
    assert growing_positions(11, 2, 3, 3) == 9 + 10 + 10 + 11 + 11 + 12
    assert growing_positions(11, 2, 3, 0) == 0
    assert growing_positions(0, 0, 7, 4) == 0  # nothing generating reads nothing


def test_when_a_finished_slot_frees():
    assert notice_step(10, 8, 0) == 16  # the end of its run of 8 steps
    assert notice_step(10, 8, 1) == 24  # CUDA reads each look one run late
    assert notice_step(16, 8, 0) == 16


def test_length_model_draws():
    assert LengthModel(mean=11.4, cap=12, sigma=0).draw(random.Random(0)) == 11
    rng = random.Random(0)
    lengths = [LengthModel(mean=4096, cap=8192).draw(rng) for _ in range(2000)]
    assert min(lengths) >= 1 and max(lengths) == 8192  # the cap is reached: a long tail
    with pytest.raises(ValueError, match="low <= cap"):
        LengthModel(mean=10, cap=0)


# ---------------------------------------------------------------------------------------------- one generate call


def test_a_full_batch_decodes_its_tokens_less_the_prefills():
    requests = [Request(5, 10, 10)] * 4
    assert call_seconds(requests, EVERY_STEP, STEP) == pytest.approx(9 * 0.01)
    with_prefill = DecodeCost(0.01, 0.0, 0.0, prefill_token_s=0.001)
    assert call_seconds(requests, EVERY_STEP, with_prefill) == pytest.approx(0.09 + 4 * 5 * 0.001)


def test_waiting_requests_take_the_slots_that_free():
    # 8 requests through 4 slots: 9 steps, the second four prefilled, 9 more
    assert call_seconds([Request(5, 10, 10)] * 8, EVERY_STEP, STEP) == pytest.approx(18 * 0.01)


def test_the_tail_runs_on_a_smaller_batch():
    per_slot = DecodeCost(fixed_s=0.0, per_slot_s=0.001, per_kv_s=0.0, prefill_token_s=0.0)
    requests = [Request(5, 5, 21), Request(5, 5, 21), Request(5, 21, 21)]
    # 4 steps over a bucket of 4 slots, then the long one alone on a bucket of 2 for 16 steps
    assert call_seconds(requests, EVERY_STEP, per_slot) == pytest.approx(4 * 0.004 + 16 * 0.002)


def test_attention_reads_each_live_sequences_own_positions():
    engine = EngineModel(slots=2, sync_every=1, lookahead=0)
    cost = DecodeCost(fixed_s=0.5, per_slot_s=0.0, per_kv_s=1.0, prefill_token_s=0.0)
    # prompt 10, 4 tokens: 3 decode steps reading 11, 12, 13 positions
    assert call_seconds([Request(10, 4, 4)], engine, cost) == pytest.approx(3 * 0.5 + 36)
    # beside it a sequence of prompt 3 that stops after 2 tokens: it reads 4 positions in its one decode step and
    # nothing once it is finished, although its slot is held until the call ends
    assert call_seconds([Request(10, 4, 4), Request(3, 2, 4)], engine, cost) == pytest.approx(3 * 0.5 + 36 + 4)


def test_a_sequence_that_stopped_early_is_noticed_at_the_next_look():
    cost = DecodeCost(fixed_s=1.0, per_slot_s=0.0, per_kv_s=0.0, prefill_token_s=0.0)
    stopped = [Request(5, 3, 20)] * 2  # both stop after 3 tokens (step 2) of a 20-token limit
    assert call_seconds(stopped, EngineModel(slots=2, sync_every=4, lookahead=0), cost) == 4.0
    assert call_seconds(stopped, EngineModel(slots=2, sync_every=4, lookahead=1), cost) == 8.0
    capped = [Request(5, 3, 3)] * 2  # at their limit the engine ends the call without waiting for a look
    assert call_seconds(capped, EngineModel(slots=2, sync_every=4, lookahead=1), cost) == 2.0


def test_a_weight_swap_pauses_at_a_token_boundary_and_recomputes_the_cache():
    cost = DecodeCost(fixed_s=0.01, per_slot_s=0.0, per_kv_s=0.0, prefill_token_s=0.001)
    call = EngineCall([Request(5, 10, 10)] * 2, EngineModel(slots=2, sync_every=1, lookahead=0), cost, 0.0, 0)
    assert call.clock == pytest.approx(0.01)  # the prompts' prefill
    boundary = call.boundary_at_or_after(0.035)  # mid-step 3: the step finishes first
    assert boundary == pytest.approx(0.01 + 3 * 0.01)
    call.move_to(boundary)
    assert call.step == 3 and call.held_tokens() == 2 * (5 + 3)
    call.resume(1.0, version=1)  # after the publish round: 16 tokens recomputed
    assert call.clock == pytest.approx(1.0 + 16 * 0.001)
    assert call.run_alone() == pytest.approx(1.016 + 6 * 0.01)


# ---------------------------------------------------------------------------------------------- the whole system


def test_synchronous_step_is_generation_then_training_then_publication():
    model = system(reward_s=0.1, host_s=0.05)
    records = simulate(model, 3)
    gather = 0.09 + 4 * 0.1 + 0.05  # decode, score 4 answers, deliver the group
    for record in records:
        assert record.gather_s == pytest.approx(gather)
        assert record.train_s == pytest.approx(1.0)
        assert record.sync_s == pytest.approx(0.5)
        assert record.step_s == pytest.approx(gather + 1.5)
        assert record.staleness == (0,)
    # the generation GPU decodes for 0.09 s of every step and waits the rest: for the host, the round, the learner
    summary = summarize(records, warmup=1)
    step = gather + 1.5
    assert summary.generation == pytest.approx({"decode": 0.09 / step, "host": 0.45 / step, "sync": 0.5 / step,
                                                "wait": 1.0 / step})
    assert summary.train_idle == pytest.approx(1 - 1.0 / step)
    assert summary.trajectories_per_s == pytest.approx(4 / step)
    assert summary.trained_tokens_per_s == pytest.approx(60 / step)


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
def test_asynchronous_generation_runs_ahead_at_most_max_staleness_versions(max_staleness):
    records = simulate(system(max_staleness=max_staleness, reward_s=0.1, host_s=0.05), 4 * (max_staleness + 2))
    assert max(max(r.staleness) for r in records) == max_staleness  # it runs as far ahead as the rule allows
    steady = records[2 * (max_staleness + 1):]
    for record in steady:  # generation (0.54 s a group) hides behind training: the learner never waits
        assert record.gather_s == pytest.approx(0.0)
        assert record.step_s == pytest.approx(1.5)


def test_asynchronous_step_bound_by_generation_includes_the_publish_pause():
    slow = DecodeCost(fixed_s=0.3, per_slot_s=0.0, per_kv_s=0.0, prefill_token_s=0.0)
    records = simulate(system(max_staleness=1, decode=slow, reward_s=0.1, host_s=0.05), 12)
    # a group takes 9 x 0.3 s to decode, 0.4 s to score, 0.05 s to deliver, and the worker pauses 0.5 s in the
    # publish round of every step: the learner trains 1 s of each 3.65 s step and waits the rest
    for record in records[4:]:
        assert record.step_s == pytest.approx(2.7 + 0.4 + 0.05 + 0.5)
    assert summarize(records, 4).train_idle == pytest.approx(1 - 1.0 / 3.65)


def test_one_worker_asking_first_takes_the_whole_step():
    two = dict(rollout_workers=2, groups_per_step=2, engine=EngineModel(slots=8, sync_every=1, lookahead=0),
               reward_s=0.1, host_s=0.05)
    spread = simulate(system(**two, groups_per_request=1), 3)
    greedy = simulate(system(**two, groups_per_request=2), 3)
    for record in spread:  # each worker one group, side by side
        assert record.gather_s == pytest.approx(0.09 + 0.4 + 0.05)
    for record in greedy:  # one worker both groups in one call of 8 answers; the other waits
        assert record.gather_s == pytest.approx(0.09 + 0.8 + 2 * 0.05)


def test_every_admitted_group_is_accounted_for():
    model = system(rollout_workers=3, groups_per_step=4, groups_per_request=2, max_staleness=2,
                   lengths=LengthModel(mean=6, cap=10, sigma=0.5), filtered_fraction=0.3)
    simulation = Simulation(model, seed=3)
    records = simulation.run(10)
    consumed = sum(r.trajectories for r in records) // model.group_size
    in_flight = sum(len(w.groups) + len(w.deliveries) for w in simulation.workers)
    assert simulation.filtered > 0 and consumed == 10 * model.groups_per_step
    assert simulation.admitted == (consumed + len(simulation._batch) + simulation.filtered + simulation.stale
                                   + len(simulation.queue) + in_flight)
    assert all(max(r.staleness) <= 2 for r in records)


def test_a_full_queue_makes_workers_wait():
    model = system(max_staleness=None, queue_capacity=2, rollout_workers=2, reward_s=0.1, host_s=0.05)
    simulation = Simulation(model, seed=0)
    simulation.run(6)
    assert len(simulation.queue) <= 2
    assert sum(w.totals[state] for w in simulation.workers for state in w.totals if state.value == "wait") > 0


def test_the_same_seed_gives_the_same_steps():
    model = system(max_staleness=1, lengths=LengthModel(mean=6, cap=10), filtered_fraction=0.2, rollout_workers=2)
    assert simulate(model, 6, seed=5) == simulate(model, 6, seed=5)
    assert simulate(model, 6, seed=5) != simulate(model, 6, seed=6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="groups_per_request"):
        system(groups_per_request=0)
    with pytest.raises(ValueError, match="queue_capacity"):
        system(queue_capacity=0)
    with pytest.raises(ValueError, match="filtered_fraction"):
        system(filtered_fraction=1.0)
