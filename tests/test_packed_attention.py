"""Packed sequences: attention stays inside each document, and packed results equal padded ones."""

import pytest
import torch

from areal_async.model import CausalLM, DecoderConfig, packed_sequence_logprobs, sequence_logprobs
from areal_async.packing import pack_prompt_output_batch, pad_prompt_output_batch

SHAPE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
OUTPUTS = [[20, 21, 22, 23], [24, 25], [], [26, 27, 28, 29, 30, 31, 32]]


def _model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(DecoderConfig(**{**SHAPE, **overrides})).eval()


def _packed_logits(model: CausalLM, batch) -> torch.Tensor:
    """[N, vocab] logits of a packed batch."""
    return model(batch.input_ids, positions=batch.positions, document_ids=batch.document_ids)[0]


def test_packed_logits_equal_each_sequence_run_alone():
    model = _model()
    batch = pack_prompt_output_batch(PROMPTS, OUTPUTS)
    with torch.no_grad():
        packed = _packed_logits(model, batch)
        alone = torch.cat([model(torch.tensor([p + o]))[0] for p, o in zip(PROMPTS, OUTPUTS)])
    assert packed.shape == alone.shape == (batch.num_tokens, SHAPE["vocab_size"])
    assert (packed - alone).abs().max().item() < 1e-5


def test_changing_one_document_leaves_the_others_unchanged():
    model = _model(1)
    changed_outputs = [OUTPUTS[0], [40, 41, 42, 43, 44], *OUTPUTS[2:]]  # document 1 changes tokens and length
    before = pack_prompt_output_batch(PROMPTS, OUTPUTS)
    after = pack_prompt_output_batch(PROMPTS, changed_outputs)
    with torch.no_grad():
        logits_before, logits_after = _packed_logits(model, before), _packed_logits(model, after)
    for document in (0, 2, 3):
        rows_before = logits_before[before.document_ids[0] == document]
        rows_after = logits_after[after.document_ids[0] == document]
        assert (rows_before - rows_after).abs().max().item() < 1e-5, document


def test_packed_logprobs_equal_padded_sequence_logprobs():
    model = _model(2)
    temperature = 0.7
    packed = pack_prompt_output_batch(PROMPTS, OUTPUTS)
    padded = pad_prompt_output_batch(PROMPTS, OUTPUTS, pad_token_id=0)
    with torch.no_grad():
        from_packed = packed_sequence_logprobs(model, packed, temperature)
        from_padded = sequence_logprobs(model, padded.input_ids, padded.valid, temperature)
    assert from_packed.shape == (packed.num_tokens,)
    # Both layouts list the trained positions sequence by sequence, in order.
    trained_packed, trained_padded = from_packed[packed.output_mask], from_padded[padded.output_mask]
    assert trained_packed.shape == (sum(len(o) for o in OUTPUTS),)
    assert (trained_packed - trained_padded).abs().max().item() < 1e-5


def test_packed_mode_needs_positions_and_no_padding_arguments():
    model = _model()
    batch = pack_prompt_output_batch(PROMPTS, OUTPUTS)
    with pytest.raises(ValueError, match="packed mode"):
        model(batch.input_ids, document_ids=batch.document_ids)
    with pytest.raises(ValueError, match="packed mode"):
        model(batch.input_ids, valid=torch.ones_like(batch.input_ids, dtype=torch.bool),
              positions=batch.positions, document_ids=batch.document_ids)


# flex vs. SDPA kernels with bf16 activations, fp32 log-softmax: an H100 (torch 2.11) measured about 8e-3,
# about what either bf16 kernel differs from fp32.
BF16_LOGPROB_BOUND = 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_attention_packed_logprobs_match_padded_sdpa_in_bf16():
    """The CUDA path (flex_attention + BlockMask) against the padded SDPA path, on sequences that straddle
    flex's 128-token blocks, forward and backward."""
    model = _model(3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2).cuda().to(torch.bfloat16)
    generator = torch.Generator().manual_seed(4)
    lengths = [(17, 150), (3, 40), (60, 200), (1, 1), (90, 33)]
    prompts = [torch.randint(1, SHAPE["vocab_size"], (p,), generator=generator).tolist() for p, _ in lengths]
    outputs = [torch.randint(1, SHAPE["vocab_size"], (o,), generator=generator).tolist() for _, o in lengths]
    packed = pack_prompt_output_batch(prompts, outputs).to("cuda")
    padded = pad_prompt_output_batch(prompts, outputs, pad_token_id=0)

    from_packed = packed_sequence_logprobs(model, packed)[packed.output_mask]
    from_packed.sum().backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()
    model.zero_grad(set_to_none=True)
    from_padded = sequence_logprobs(model, padded.input_ids.cuda(), padded.valid.cuda())[padded.output_mask.cuda()]
    from_padded.sum().backward()
    padded_grad = model.model.layers[0].self_attn.q_proj.weight.grad.float()

    assert (from_packed - from_padded).abs().max().item() < BF16_LOGPROB_BOUND
    assert (packed_grad - padded_grad).norm().item() < 0.05 * padded_grad.norm().item()
