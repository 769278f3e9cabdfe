"""The decoder's elementwise Triton kernels (areal_async/model/elementwise_triton.py) under Triton's interpreter on
the CPU, against the eager ops they stand in for: RMSNorm with and without the residual add, SiLU(gate) x up on
views of one fused projection, RoPE on a transposed view, and a whole engine with them on against one without.
The interpreter runs in a process of its own (tests/triton_interpreter.py); on a GPU the engine runs them for
real in benchmarks/bench_generation.py --check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from actors.engine import TorchEngine
from areal_async.model import CausalLM, DecoderConfig
from areal_async.model.decoder import RMSNorm, apply_rope, rope_cos_sin
from areal_async.types import SamplingParams

pytest.importorskip("triton")
RUNNER = Path(__file__).with_name("triton_interpreter.py")
ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16)
TINY = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, attention_bias=True)
PROMPTS = [[5, 9, 2], [7] * 18, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
ENGINE_PARAMS = (dict(max_new_tokens=8, temperature=0.0), dict(max_new_tokens=8, temperature=1.0, seed=4))


def norm_inputs(dtype: torch.dtype) -> dict:
    """Rows of width 48 (not a power of two) in a [2, 7, 48] batch, a residual and a norm with random weights."""
    generator = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(2, 7, 48, generator=generator).to(dtype) for _ in range(2))
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=generator) + 0.5)
    return {"x": x, "residual": residual, "norm": norm.to(dtype)}


def mlp_inputs(dtype: torch.dtype) -> torch.Tensor:
    """A fused gate/up projection's output [3, 5, 2 x 80]: gate and up are its halves (row stride 160)."""
    return (torch.randn(3, 5, 160, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)


def rope_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B=2, H=6, T=5, D=16] as the transposed view of a [2, 5, 6 + 2 x 2 heads, 16] projection; positions start
    at 0 and at 37."""
    projection = torch.randn(2, 5, 10, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = projection[:, :, :6].transpose(1, 2)
    positions = torch.arange(5)[None, :] + torch.tensor([[0], [37]])
    cos, sin = rope_cos_sin(positions, 16, 10000.0)
    return q, cos, sin


def tiny_model() -> CausalLM:
    torch.manual_seed(5)
    return CausalLM(DecoderConfig(**TINY))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every case's outputs from one interpreter process, keyed by (kernel, dtype) or ("generate", params)."""
    folder = tmp_path_factory.mktemp("elementwise")
    keys, cases = [], []
    for dtype in DTYPES:
        norm = norm_inputs(dtype)
        weight, eps = norm["norm"].weight.detach(), norm["norm"].eps
        gate, up = mlp_inputs(dtype).chunk(2, dim=-1)
        keys += [("rms_norm", dtype), ("add_rms_norm", dtype), ("silu_mul", dtype), ("rope", dtype)]
        cases += [("rms_norm", (norm["x"], weight, eps)), ("rms_norm", (norm["x"], weight, eps, norm["residual"])),
                  ("silu_mul", (gate, up)), ("rope", rope_inputs(dtype))]
    weights = tiny_model().state_dict()
    for index, params in enumerate(ENGINE_PARAMS):
        keys.append(("generate", index))
        cases.append(("generate", (TINY, weights, PROMPTS, params)))
    torch.save(cases, folder / "cases.pt")
    done = subprocess.run([sys.executable, str(RUNNER), str(folder / "cases.pt"), str(folder / "out.pt")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(zip(keys, torch.load(folder / "out.pt")))


def assert_matches(ours: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, roundings: int) -> None:
    """fp32: equal to rounding. bf16: Triton's interpreter rounds fp32 to bf16 toward zero (a GPU rounds to
    nearest), so a value rounded `roundings` times on its way may be that many units in the last place (at most
    2^-7 of it each) below the eager one, never more."""
    assert ours.dtype == eager.dtype and ours.shape == eager.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(ours.float(), eager.float(), rtol=roundings * 2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_kernel_equals_the_module(interpreted, dtype):
    norm = norm_inputs(dtype)
    out, summed = interpreted[("rms_norm", dtype)]
    with torch.no_grad():
        assert_matches(out, norm["norm"](norm["x"]), dtype, roundings=2)  # normed, weighted
    assert torch.equal(summed, norm["x"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_kernel_adds_the_residual_first(interpreted, dtype):
    norm = norm_inputs(dtype)
    out, summed = interpreted[("add_rms_norm", dtype)]
    expected_sum = norm["x"] + norm["residual"]
    assert_matches(summed, expected_sum, dtype, roundings=1)  # the residual stream, as the eager add rounds it
    with torch.no_grad():
        assert_matches(out, norm["norm"](expected_sum), dtype, roundings=3)  # summed, normed, weighted


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_silu_mul_kernel_equals_the_eager_ops(interpreted, dtype):
    gate, up = mlp_inputs(dtype).chunk(2, dim=-1)
    out = interpreted[("silu_mul", dtype)]
    assert out.is_contiguous()
    assert_matches(out, F.silu(gate) * up, dtype, roundings=2)  # SiLU, product


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_kernel_equals_apply_rope(interpreted, dtype):
    q, cos, sin = rope_inputs(dtype)
    out = interpreted[("rope", dtype)]
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert_matches(out, apply_rope(q, cos, sin), dtype, roundings=1)


@pytest.mark.parametrize("index", range(len(ENGINE_PARAMS)), ids=["greedy", "sampled"])
def test_engine_with_the_kernels_generates_what_it_does_without(interpreted, index):
    """fp32, prefill (its RoPE in the kernel) and decode steps: the same tokens, logprobs equal to rounding."""
    engine = TorchEngine(tiny_model(), pad_token_id=0, max_slots=4, kv_block_size=16, elementwise_kernels=False)
    expected = engine.generate(PROMPTS, SamplingParams(**ENGINE_PARAMS[index]))
    ours = interpreted[("generate", index)]
    assert [tokens for tokens, _ in ours] == [g.tokens for g in expected]
    for (_, logprobs), generation in zip(ours, expected):
        assert logprobs == pytest.approx(generation.logprobs, abs=1e-5)
