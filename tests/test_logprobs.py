"""The chunked LM-head Function: the same forward as a plain log-softmax over chunks, exact gradients."""

import pytest
import torch

from areal_async.model import token_logprobs
from areal_async.model.logprobs import _chunk_logit_grad_eager, _chunk_logit_grad_fusable


def plain_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=1024):
    """Plain autograd reference: log_softmax over each chunk's fp32 logits, gathered at the targets."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size] @ weight.T).float() / temperature
        picked = logits.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


@pytest.mark.parametrize("rows,chunk_size,temperature", [(37, 8, 1.0), (100, 1024, 0.7), (64, 16, 1.3), (1, 4, 1.0)])
def test_forward_is_identical_and_gradients_match_plain_autograd(rows, chunk_size, temperature):
    torch.manual_seed(rows)
    hidden = torch.randn(rows, 16, requires_grad=True)
    weight = torch.randn(53, 16, requires_grad=True)
    targets = torch.randint(0, 53, (rows,))
    upstream = torch.randn(rows)
    expected = plain_logprobs(hidden, weight, targets, temperature, chunk_size)
    got = token_logprobs(hidden, weight, targets, temperature, chunk_size)
    assert torch.equal(got, expected)  # same operations in the same order on CPU
    default_chunks = token_logprobs(hidden, weight, targets, temperature)
    assert torch.equal(default_chunks, plain_logprobs(hidden, weight, targets, temperature))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    for g, e in zip(got_grads, expected_grads):
        assert (g - e).norm() <= 1e-5 * e.norm()


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, targets, 0.8, 4), (hidden, weight))
    assert torch.autograd.gradcheck(lambda h: token_logprobs(h, weight.detach(), targets, 1.0, 5), (hidden,))
    assert torch.autograd.gradcheck(lambda w: token_logprobs(hidden.detach(), w, targets, 1.0, 64), (weight,))


def test_leading_shape_and_empty_input():
    weight = torch.randn(11, 6)
    assert token_logprobs(torch.randn(2, 5, 6), weight, torch.randint(0, 11, (2, 5))).shape == (2, 5)
    empty = token_logprobs(torch.randn(0, 6), weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_fusable_logit_gradient_equals_eager():
    """The expression compiled for CUDA computes the eager backward's chunk gradient."""
    torch.manual_seed(1)
    logits, targets, upstream = torch.randn(9, 31), torch.randint(0, 31, (9,)), torch.randn(9)
    lse = torch.logsumexp(logits / 0.6, -1)
    eager = _chunk_logit_grad_eager(logits, targets, lse, upstream, 0.6)
    fusable = _chunk_logit_grad_fusable(logits, targets, lse, upstream, 0.6)
    assert (eager - fusable).abs().max() < 1e-6


def test_bf16_gradients_keep_the_parameter_dtype():
    hidden = torch.randn(20, 8).bfloat16().requires_grad_()
    weight = torch.randn(30, 8).bfloat16().requires_grad_()
    out = token_logprobs(hidden, weight, torch.randint(0, 30, (20,)), 1.0, 8)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
