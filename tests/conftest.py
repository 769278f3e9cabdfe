import pytest
import torch

from areal_async.model import CausalLM, DecoderConfig

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    """Both modules hold the same tensors under the same names, bit for bit."""
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def tiny_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(DecoderConfig(**TINY))


def behaviour_logprob_gap(model: CausalLM, prompts, outputs, temperature: float) -> float:
    """Max |engine logprob - the model's recomputed logprob| over every generated token of `outputs`
    (Generations for `prompts`), as the learner recomputes them."""
    from areal_async.model import sequence_logprobs
    from areal_async.packing import pad_prompt_output_batch

    batch = pad_prompt_output_batch(prompts, [o.tokens for o in outputs], pad_token_id=0,
                                    per_token={"behaviour": [o.logprobs for o in outputs]})
    with torch.no_grad():
        recomputed = sequence_logprobs(model, batch.input_ids, batch.valid, temperature)
    return (recomputed - batch.values["behaviour"])[batch.output_mask].abs().max().item()
