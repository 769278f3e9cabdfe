"""data.success_rate_range: prompts the policy always or never solves are skipped when the data order returns
to them; the fraction a group solved comes from the rollout worker with the delivery."""

import math

import numpy as np
import pytest

from actors.rollout import RolloutWorker
from areal_async.actor_system.controller import RolloutController
from areal_async.run.cli import compose_config
from areal_async.data.records import PromptRecord
from areal_async.types import Trajectory


def _controller(success_rate_range):
    records = [PromptRecord(f"q{i}", f"prompt {i}", ("1",)) for i in range(4)]
    return RolloutController(records, lambda text: [1, 2, 3], group_size=4, groups_per_step=4, max_staleness=None,
                             seed=0, success_rate_range=success_rate_range)


def _epoch(controller, solved_by_query):
    """Admits until a whole epoch of prompts was walked; delivers each group with its query's solved fraction."""
    start, admitted = controller.position, []
    while controller.position < start + len(controller.records):
        group = controller.admit(current_version=0)
        admitted.append(group.query_id)
        controller.delivered(group.group_id, solved=solved_by_query[group.query_id])
    return admitted


def test_prompts_solved_always_or_never_are_skipped_in_the_next_epoch():
    controller = _controller((0.1, 0.9))
    solved = {"q0": 1.0, "q1": 0.5, "q2": 0.0, "q3": None}  # q3: the verifier judged none of its answers
    assert sorted(_epoch(controller, solved)) == ["q0", "q1", "q2", "q3"]
    assert sorted(_epoch(controller, solved)) == ["q1", "q3"] and controller.skipped == 2
    assert controller.produced == 6 and controller.position == 8  # groups admitted / prompts walked
    resumed = _controller((0.1, 0.9))
    resumed.load_state_dict(controller.state_dict())
    # the resumed controller keeps what it learnt (an admission may skip on into the next epoch's order)
    assert set(_epoch(resumed, solved)) == {"q1", "q3"} and resumed.skipped >= 4


def test_without_a_range_every_prompt_comes_back():
    controller = _controller(None)
    solved = {f"q{i}": 1.0 for i in range(4)}
    _epoch(controller, solved)
    assert sorted(_epoch(controller, solved)) == ["q0", "q1", "q2", "q3"] and controller.skipped == 0


def test_a_whole_pass_of_skipped_prompts_admits_the_next_one_anyway():
    controller = _controller((0.1, 0.9))
    _epoch(controller, {f"q{i}": 1.0 for i in range(4)})
    group = controller.admit(current_version=0)
    assert group is not None and controller.skipped == 4


def test_the_worker_reports_the_fraction_of_scored_answers_that_were_correct():
    class Verifier:
        correct_reward, incorrect_reward = 5.0, -5.0

    worker = RolloutWorker(engine=None, decode=str, verifier=Verifier(), stop_token_ids=[0])
    group = [Trajectory("q", "g", i, np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32),
                        np.zeros(1, np.int32), reward, "stop") for i, reward in enumerate([5.0, -5.0, math.nan, 5.0])]
    assert worker.solved(group) == pytest.approx(2 / 3)
    assert worker.solved(group[2:3]) is None


@pytest.mark.parametrize("bounds", ["[0.9,0.1]", "[0.1]", "[-0.1,0.5]"])
def test_a_bad_range_is_refused_when_the_config_is_composed(bounds):
    with pytest.raises(ValueError, match="data.success_rate_range"):
        compose_config("train", [f"data.success_rate_range={bounds}"])
