"""Packed sequences: attention stays inside each document, and packed results equal padded ones."""

import pytest
import torch

from areal_async.config import LearnerConfig, PackedAttentionConfig, PackedAttentionKernel
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
# about what either bf16 kernel differs from fp32. The varlen flash kernel is held to the same bound.
BF16_LOGPROB_BOUND = 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flash", "flex", "cudnn"])
def test_cuda_packed_logprobs_match_padded_sdpa_in_bf16(backend):
    """The CUDA packed paths (varlen flash kernel; flex_attention + BlockMask; cuDNN length groups, here five
    lengths including a one-token document) against the padded SDPA path,
    on sequences that straddle flex's 128-token blocks, forward and backward."""
    settings = LearnerConfig(packed_attention=PackedAttentionConfig(kernel=PackedAttentionKernel(backend)))
    model = _model(3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2).cuda().to(torch.bfloat16)
    generator = torch.Generator().manual_seed(4)
    lengths = [(17, 150), (3, 40), (60, 200), (1, 1), (90, 33)]
    prompts = [torch.randint(1, SHAPE["vocab_size"], (p,), generator=generator).tolist() for p, _ in lengths]
    outputs = [torch.randint(1, SHAPE["vocab_size"], (o,), generator=generator).tolist() for _, o in lengths]
    packed = pack_prompt_output_batch(prompts, outputs).to("cuda")
    padded = pad_prompt_output_batch(prompts, outputs, pad_token_id=0)

    from_packed = packed_sequence_logprobs(model, packed, learner=settings)[packed.output_mask]
    from_packed.sum().backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()
    model.zero_grad(set_to_none=True)
    from_padded = sequence_logprobs(model, padded.input_ids.cuda(), padded.valid.cuda())[padded.output_mask.cuda()]
    from_padded.sum().backward()
    padded_grad = model.model.layers[0].self_attn.q_proj.weight.grad.float()

    assert (from_packed - from_padded).abs().max().item() < BF16_LOGPROB_BOUND
    assert (packed_grad - padded_grad).norm().item() < 0.05 * padded_grad.norm().item()


def test_document_spans_mark_each_run_of_ids_within_a_row():
    from areal_async.model.attention import document_spans

    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [2, 2, 5, 5, 5, 5, 5, 7]])  # row 1 starts a new document
    spans = document_spans(ids)
    assert spans.cu_seqlens.dtype == torch.int32
    assert spans.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 15, 16]
    assert spans.max_len == 5


def _reference_flash_forward(q, k, v, cu_seqlens, max_len):
    """Math stand-in for the CUDA varlen flash kernel: (out [N, H, D], logsumexp [H, N])."""
    tokens, heads, dim = q.shape
    group = heads // k.shape[1]
    document = torch.bucketize(torch.arange(tokens), cu_seqlens[1:].long(), right=True)
    allowed = (document[:, None] == document[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    assert int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) == max_len
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys).div(dim**0.5).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.einsum("hqk,khd->qhd", (scores - lse[..., None]).exp(), values), lse


def _reference_flash_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_len):
    """The analytic gradient of `_reference_flash_forward` (dq, dk, dv), GQA heads summed."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    document = torch.bucketize(torch.arange(tokens), cu_seqlens[1:].long(), right=True)
    allowed = (document[:, None] == document[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q, keys).div(dim**0.5).masked_fill(~allowed, float("-inf"))
    probs = (scores - lse[..., None]).exp()
    grad_values = torch.einsum("hqk,qhd->khd", probs, grad_out)
    grad_probs = torch.einsum("qhd,khd->hqk", grad_out, values)
    delta = (grad_out * out).sum(-1).T  # [H, N]
    grad_scores = probs * (grad_probs - delta[..., None]) / dim**0.5
    grad_q = torch.einsum("hqk,khd->qhd", grad_scores, keys)
    grad_keys = torch.einsum("hqk,qhd->khd", grad_scores, q)
    fold = lambda t: t.reshape(tokens, kv_heads, group, dim).sum(2)  # noqa: E731
    return grad_q, fold(grad_keys), fold(grad_values)


def _logprobs_and_grads(model, batch):
    """Packed logprobs at T = 0.9 and the parameter gradients of a fixed weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logprobs = packed_sequence_logprobs(model, batch, 0.9)
    weights = torch.linspace(-1, 1, int(batch.output_mask.sum()), dtype=logprobs.dtype)
    (logprobs[batch.output_mask] * weights).sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True])
def test_flash_layout_matches_dense_mask_path(monkeypatch, compiled):
    """The varlen-flash code path (DocumentSpans, [tokens, heads, dim] layout, the custom op's autograd and
    fake implementations) with a math stand-in for the CUDA kernel: logprobs and gradients equal the dense
    SDPA path's."""
    from areal_async.model import attention as model_attention, decoder

    torch.manual_seed(5)
    model = _model(5).to(torch.float64).train()
    batch = pack_prompt_output_batch(PROMPTS, OUTPUTS)

    dense_logprobs, dense_grads = _logprobs_and_grads(model, batch)
    monkeypatch.setattr(model_attention, "_flash_varlen_forward_impl", _reference_flash_forward)
    monkeypatch.setattr(model_attention, "_flash_varlen_backward_impl", _reference_flash_backward)
    monkeypatch.setattr(decoder, "packed_attention_mask", lambda ids, dtype, head_dim, lengths=None, settings=None:
                        model_attention.document_spans(ids, model_attention.offsets_from_lengths(ids, lengths)))
    if compiled:
        torch._dynamo.reset()
        for layer in model.model.layers:
            layer.compile(backend="aot_eager")
    flash_logprobs, flash_grads = _logprobs_and_grads(model, batch)
    if compiled:
        torch._dynamo.reset()
    assert (flash_logprobs - dense_logprobs).abs().max().item() < 1e-10
    for name, grad in dense_grads.items():
        assert (flash_grads[name] - grad).norm().item() <= 1e-10 * (1 + grad.norm().item()), name


def _reference_cudnn_forward(q, k, v, documents, length):
    """Math stand-in for cuDNN's fused causal attention over equal-length documents packed back to back:
    (out [N, H, D], logsumexp [documents, H, length, 1]), through the varlen stand-in above."""
    cu_seqlens = torch.arange(documents + 1, dtype=torch.int32) * length
    out, lse = _reference_flash_forward(q, k, v, cu_seqlens, length)  # lse [H, N]
    return out, lse.view(q.shape[1], documents, length).transpose(0, 1)[..., None]


def _reference_cudnn_backward(grad_out, q, k, v, out, lse, documents, length):
    cu_seqlens = torch.arange(documents + 1, dtype=torch.int32) * length
    flat_lse = lse[..., 0].transpose(0, 1).reshape(q.shape[1], -1)
    return _reference_flash_backward(grad_out, q, k, v, out, flat_lse, cu_seqlens, length)


# Documents of one length (4 x 5 tokens: no permutation), of two lengths interleaved (5, 9, 5, 9) and of four.
LENGTH_CASES = {
    "equal": ([[5, 6, 7], [8, 9, 10], [11, 12], [13, 14, 15]], [[20, 21], [22, 23], [24, 25, 26], [27, 28]]),
    "two_lengths": ([[5, 6, 7], [8, 9], [11, 12], [13, 14, 15, 16]], [[20, 21], [22, 23, 1, 2, 3, 4, 5], [24, 25, 26],
                                                                      [27, 28, 29, 30, 31]]),
    "four_lengths": (PROMPTS, OUTPUTS),
}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("case", list(LENGTH_CASES))
def test_cudnn_length_group_path_matches_sdpa_path(monkeypatch, case, compiled):
    """The cuDNN code path (LengthGroups with the "cudnn" kernel: the permutation into length groups, the
    [documents, heads, length, dim] views, the custom op's autograd and fake implementations) with a math
    stand-in for the CUDA kernel: logprobs and gradients equal the SDPA length-group path's."""
    from areal_async.model import attention as model_attention, decoder

    prompts, outputs = LENGTH_CASES[case]
    model = _model(6).to(torch.float64).train()
    batch = pack_prompt_output_batch(prompts, outputs)

    sdpa_logprobs, sdpa_grads = _logprobs_and_grads(model, batch)
    monkeypatch.setattr(model_attention, "_cudnn_causal_forward_impl", _reference_cudnn_forward)
    monkeypatch.setattr(model_attention, "_cudnn_causal_backward_impl", _reference_cudnn_backward)
    layouts = []

    def cudnn_layout(ids, dtype, head_dim, lengths=None, settings=None):
        layouts.append(model_attention.document_length_groups(ids, kernel="cudnn", repeat_kv=case == "four_lengths",
                                                      offsets=model_attention.offsets_from_lengths(ids, lengths)))
        return layouts[-1]

    monkeypatch.setattr(decoder, "packed_attention_mask", cudnn_layout)
    if compiled:
        torch._dynamo.reset()
        for layer in model.model.layers:
            layer.compile(backend="aot_eager")
    cudnn_logprobs, cudnn_grads = _logprobs_and_grads(model, batch)
    if compiled:
        torch._dynamo.reset()
    assert (layouts[0].order is None) == (case == "equal")
    assert len(layouts[0].groups) == {"equal": 1, "two_lengths": 2, "four_lengths": 4}[case]
    assert (cudnn_logprobs - sdpa_logprobs).abs().max().item() < 1e-10
    for name, grad in sdpa_grads.items():
        assert (cudnn_grads[name] - grad).norm().item() <= 1e-10 * (1 + grad.norm().item()), name


def test_length_groups_order_documents_by_length():
    from areal_async.model.attention import document_length_groups

    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]])  # lengths 2, 3, 2, 3
    layout = document_length_groups(ids, kernel="cudnn")
    assert layout.groups == ((2, 2), (2, 3)) and layout.kernel == "cudnn"
    assert layout.order.tolist() == [0, 1, 5, 6, 2, 3, 4, 7, 8, 9]
    assert layout.order[layout.inverse].tolist() == list(range(10))
    equal = document_length_groups(torch.tensor([[4, 4, 4, 7, 7, 7]]))
    assert equal.order is None and equal.inverse is None and equal.groups == ((2, 3),) and equal.kernel == "sdpa"


def test_layout_from_host_lengths_matches_read_ids():
    """A PackedBatch's host-side document lengths give the layout read from its document ids (no device read),
    and the grouping needs a permutation exactly when the lengths decrease somewhere."""
    from areal_async.model import attention as model_attention
    from areal_async.packing import pack_prompt_output_batch

    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        count = int(torch.randint(1, 6, (), generator=generator))
        lengths = torch.randint(2, 6, (count,), generator=generator).tolist()
        batch = pack_prompt_output_batch([[1] * (n - 1) for n in lengths], [[2]] * count)
        ids = batch.document_ids
        assert batch.document_lengths == tuple(lengths) and batch.to("cpu").document_lengths == tuple(lengths)
        offsets = model_attention.offsets_from_lengths(ids, batch.document_lengths)
        assert torch.equal(offsets, model_attention._document_offsets(ids))
        read, given = model_attention.document_length_groups(ids), model_attention.packed_attention_mask(ids, None, 8, lengths)
        assert read.groups == given.groups and (read.order is None) == (given.order is None)
        assert (read.order is None) == (lengths == sorted(lengths))
        if read.order is not None:
            assert torch.equal(read.order, given.order) and torch.equal(read.inverse, given.inverse)
            by_length = sorted(range(len(lengths)), key=lambda d: (lengths[d], d))
            expected = [t for d in by_length for t in range(sum(lengths[:d]), sum(lengths[: d + 1]))]
            assert read.order.tolist() == expected
    with pytest.raises(ValueError):
        model_attention.offsets_from_lengths(torch.zeros(1, 5, dtype=torch.long), (2, 2))


def test_cuda_kernel_choice():
    """Which kernel a CUDA pack gets: cuDNN length groups under "auto" only for few, long lengths."""
    from areal_async.model import attention as model_attention

    bf16 = torch.bfloat16

    def kernel(lengths, dtype, head_dim, choice="auto"):
        settings = PackedAttentionConfig(PackedAttentionKernel(choice), cudnn_max_lengths=2, cudnn_min_length=512)
        return model_attention.cuda_packed_kernel(lengths, dtype, head_dim, settings)

    assert kernel([4096] * 4, bf16, 128) == "cudnn"
    assert kernel([4096, 2048, 4096], bf16, 128) == "cudnn"
    assert kernel([4096, 2048, 1024], bf16, 128) == "flash"  # three lengths
    assert kernel([4096, 100], bf16, 128) == "flash"  # a short document
    assert kernel([4096], bf16, 256) == "flash"  # head too large for cuDNN here
    assert kernel([4096], torch.float32, 128) == "flex"
    assert kernel([4096] * 4, bf16, 128, "flash") == "flash"
    assert kernel([4096, 2048, 1024, 100], bf16, 128, "cudnn") == "cudnn"
    assert kernel([4096], bf16, 128, "flex") == "flex"
    with pytest.raises(ValueError, match="nonsense"):
        kernel([4096], bf16, 128, "nonsense")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cudnn_length_groups_match_varlen_flash_in_bf16():
    """cuDNN's kernel on length groups (equal lengths; two lengths, permuted) against the varlen flash kernel,
    forward and backward, bf16, grouped-query heads."""
    from areal_async.model import attention as model_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    for lengths in ([256] * 4, [640, 128, 640, 128]):
        tokens = sum(lengths)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda()
        leaves = [torch.randn(tokens, h, 128, device="cuda", dtype=torch.bfloat16, generator=generator) for h in (8, 2, 2)]
        grad = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
        results = []
        for layout in (model_attention.document_length_groups(ids, kernel="cudnn"), model_attention.document_spans(ids)):
            inputs = [t.clone().requires_grad_() for t in leaves]
            attention = model_attention.attention_by_length if isinstance(layout, model_attention.LengthGroups) \
                else model_attention.packed_flash_attention
            out = attention(*inputs, layout)
            out.backward(grad)
            results.append([out.float()] + [t.grad.float() for t in inputs])
        for got, expected in zip(*results):
            assert ((got - expected).norm() / expected.norm()).item() < 0.02
