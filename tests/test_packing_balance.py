"""Packed layout, first-fit-decreasing packs under a token budget, and LPT balance of sequences over ranks."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from areal_async.packing import balance_across_ranks, pack_prompt_output_batch, split_into_minibatches, split_into_packs


def test_packed_batch_layout():
    batch = pack_prompt_output_batch([[1, 2, 3], [4], [6, 7]], [[5, 6], [7, 8, 9], []],
                                     per_token={"lp": [[-0.5, -0.6], [-0.7, -0.8, -0.9], []]})
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 4, 7, 8, 9, 6, 7]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    # position t predicts the next token of its own sequence; at a sequence's last token the target is unused
    assert batch.targets.tolist()[:4] == [2, 3, 5, 6]
    assert batch.targets.tolist()[5:8] == [7, 8, 9]
    assert batch.targets.tolist()[9] == 7
    assert batch.output_mask.tolist() == [False, False, True, True, False,
                                          True, True, True, False,
                                          False, False]
    assert batch.values["lp"].tolist() == pytest.approx([0, 0, -0.5, -0.6, 0, -0.7, -0.8, -0.9, 0, 0, 0])
    assert batch.num_tokens == 11
    assert batch.num_output_tokens == 5


def test_a_loss_mask_leaves_the_tokens_an_episode_put_in_out_of_the_loss():
    """[1, 2] then output [5, 6, 7, 8] where 6 and 7 were a tool's message: only 5 and 8 are trained on; the values
    stay placed at every output position."""
    batch = pack_prompt_output_batch([[1, 2], [4]], [[5, 6, 7, 8], [9]],
                                     per_token={"lp": [[-0.5, 0.0, 0.0, -0.8], [-0.9]]},
                                     loss_masks=[[1, 0, 0, 1], [1]])
    assert batch.input_ids.tolist() == [[1, 2, 5, 6, 7, 8, 4, 9]]
    assert batch.output_mask.tolist() == [False, True, False, False, True, False, True, False]
    assert batch.values["lp"].tolist() == pytest.approx([0, -0.5, 0, 0, -0.8, 0, -0.9, 0])
    assert batch.num_output_tokens == 3


def test_packing_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="sequence 1 has an empty prompt"):
        pack_prompt_output_batch([[1], []], [[2], [3]])


@given(st.lists(st.integers(1, 50), min_size=0, max_size=40), st.integers(1, 120))
def test_packs_cover_every_sequence_once_within_budget(lengths, budget):
    packs = split_into_packs(lengths, budget)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    for pack in packs:
        assert sum(lengths[i] for i in pack) <= budget or len(pack) == 1
    # first fit: a sequence opens a new pack only when no earlier pack had room for it
    assert sum(1 for pack in packs if sum(lengths[i] for i in pack) <= budget // 2) <= 1


def test_first_fit_decreasing_on_a_small_example():
    assert split_into_packs([4, 7, 2, 5, 30, 3], token_budget=10) == [[4], [1, 5], [3, 0], [2]]


@given(st.lists(st.integers(0, 1000), min_size=0, max_size=60), st.integers(1, 9))
def test_rank_balance_covers_every_sequence_once_within_the_lpt_bound(lengths, num_ranks):
    ranks = balance_across_ranks(lengths, num_ranks)
    assert len(ranks) == num_ranks
    assert sorted(i for rank in ranks for i in rank) == list(range(len(lengths)))
    assert all(rank == sorted(rank) for rank in ranks)
    max_load = max(sum(lengths[i] for i in rank) for rank in ranks)
    # max load <= mean load + longest sequence, in integers: num_ranks * max <= total + num_ranks * longest
    assert num_ranks * max_load <= sum(lengths) + num_ranks * max(lengths, default=0)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=8), st.integers(1, 3))
def test_rank_balance_is_within_four_thirds_of_the_optimum(lengths, num_ranks):
    ranks = balance_across_ranks(lengths, num_ranks)
    max_load = max(sum(lengths[i] for i in rank) for rank in ranks)
    optimum = min(
        max(sum(length for length, r in zip(lengths, assignment) if r == rank) for rank in range(num_ranks))
        for assignment in itertools.product(range(num_ranks), repeat=len(lengths))
    )
    assert 3 * num_ranks * max_load <= (4 * num_ranks - 1) * optimum  # Graham: 4/3 - 1/(3 num_ranks)


def test_rank_balance_is_deterministic_with_ties():
    assert balance_across_ranks([5, 5, 5, 5, 2, 2], num_ranks=2) == [[0, 2, 4], [1, 3, 5]]
    assert balance_across_ranks([3], num_ranks=3) == [[0], [], []]


def test_minibatches_cover_every_index_once_in_near_equal_shuffled_parts():
    parts = split_into_minibatches(10, 3, seed=0)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert parts == split_into_minibatches(10, 3, seed=0) and parts != split_into_minibatches(10, 3, seed=1)
    assert [i for p in parts for i in p] != list(range(10))  # shuffled
    assert split_into_minibatches(2, 4, seed=0) in ([[0], [1], [], []], [[1], [0], [], []])
    assert split_into_minibatches(0, 1, seed=0) == [[]]
    with pytest.raises(ValueError, match=">= 1"):
        split_into_minibatches(4, 0, seed=0)
