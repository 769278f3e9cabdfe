"""The built-in engine: determinism, stop tokens, truncation, and logprob consistency with the learner."""

import copy

import pytest
import torch

from actors.engine import TorchEngine
from actors.sampling import draw, scaled_logprobs, truncate
from areal_async.types import SamplingParams
from conftest import behaviour_logprob_gap

PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]


def test_same_seed_same_output_and_other_seed_differs(tiny_model):
    engine = TorchEngine(tiny_model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    first = engine.generate(PROMPTS, params)
    second = engine.generate(PROMPTS, params)
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert [g.tokens for g in first] == [g.tokens for g in second]
    assert [g.tokens for g in first] != [g.tokens for g in other]


def test_greedy_matches_argmax_of_full_forward(tiny_model):
    engine = TorchEngine(tiny_model, pad_token_id=0)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
    for prompt, output in zip(PROMPTS, outputs):
        ids = list(prompt)
        for token in output.tokens:
            with torch.no_grad():
                expected = int(tiny_model(torch.tensor([ids]))[0, -1].argmax())
            assert token == expected
            ids.append(token)


def test_stop_token_ends_a_sequence(tiny_model):
    engine = TorchEngine(tiny_model, pad_token_id=0)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=3))
    stop = free[0].tokens[2]
    stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=3, stop_token_ids=(stop,)))
    first_stop = free[0].tokens.index(stop)
    assert stopped[0].tokens == free[0].tokens[: first_stop + 1]
    assert stopped[0].finish_reason == "stop"
    assert all(g.finish_reason in ("stop", "length") for g in stopped)
    assert all(len(g.tokens) == len(g.logprobs) == len(g.versions) for g in stopped)


def test_truncation_keeps_top_k_and_nucleus():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(truncate(logprobs, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone is < 0.7, so 0.3 joins; 0.15 starts after 0.8 of the mass
    assert torch.isinf(truncate(logprobs, top_k=0, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(truncate(logprobs, top_k=0, top_p=0.1)).tolist() == [[False, True, True, True]]
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(top_k=2)
    draws = {int(draw(logprobs, params, generator)) for _ in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_learner_recomputation(tiny_model, temperature):
    """Invariant 4: same weights -> the learner's recomputed logprobs equal the engine's (fp32, 1e-5)."""
    engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0)
    params = SamplingParams(max_new_tokens=9, temperature=temperature, top_p=0.9, seed=1, stop_token_ids=(3,))
    outputs = engine.generate(PROMPTS, params)
    assert behaviour_logprob_gap(tiny_model, PROMPTS, outputs, temperature) < 1e-5


def test_load_weights_sets_version_and_values(tiny_model):
    engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0)
    new_state = {name: p.detach() + 1.0 for name, p in tiny_model.named_parameters()}
    engine.load_weights(new_state, version=3)
    assert engine.version == 3
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, new_state[name])
    assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=0))[0].versions == [3, 3]
    with pytest.raises(KeyError, match="version 4 lacks"):
        engine.load_weights({}, version=4)


def test_scaled_logprobs_greedy_scores_at_unit_temperature():
    logits = torch.tensor([[2.0, 1.0]])
    assert torch.allclose(scaled_logprobs(logits, 0.0), torch.log_softmax(logits, -1))
    assert torch.allclose(scaled_logprobs(logits, 0.5), torch.log_softmax(logits / 0.5, -1))


def test_weight_swap_mid_decoding_recomputes_cache_and_stamps_versions(tiny_model):
    """Interruptible generation: tokens after the swap come from the new weights given the whole prefix."""
    torch.manual_seed(1)
    new_state = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in tiny_model.named_parameters()}
    engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0)
    boundaries = []

    def swap_at_third_token() -> bool:
        boundaries.append(len(boundaries))
        if len(boundaries) == 4:  # before the 4th token is sampled
            engine.load_weights(new_state, version=1)
            return True
        return False

    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0), weight_update=swap_at_third_token)
    updated = copy.deepcopy(tiny_model)
    updated.load_state_dict(new_state, strict=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.versions == [0, 0, 0] + [1] * (len(output.tokens) - 3)
        ids = list(prompt)
        for index, token in enumerate(output.tokens):
            scorer = tiny_model if index < 3 else updated
            with torch.no_grad():
                full = scorer(torch.tensor([ids]))[0, -1]
            assert token == int(full.argmax())
            assert output.logprobs[index] == pytest.approx(float(torch.log_softmax(full, -1)[token]), abs=1e-5)
            ids.append(token)
