"""The engine's Triton kernels under Triton's interpreter on the CPU, against their references: the paged split-KV
decode attention (areal_async/model/paged_decode_triton.py) against the gather-then-softmax reference, and the
draw (actors/sampling_triton.py) against actors.sampling.sample. The interpreter runs them in a process of its own
(tests/triton_interpreter.py); on a GPU they run for real in benchmarks/bench_generation.py --check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.sampling import sample
from areal_async.model.decoder import rope_cos_sin
from areal_async.model.paged_cache import paged_decode_reference
from areal_async.types import SamplingParams

pytest.importorskip("triton")
RUNNER = Path(__file__).with_name("triton_interpreter.py")
ROOT = Path(__file__).resolve().parents[1]

BLOCK, HEAD_DIM = 16, 32
# one token, a block less one, exactly one block, one more, several blocks and a partial one, an idle row, a long row
LENGTHS = [1, 15, 16, 17, 3 * BLOCK + 5, 9, 7 * BLOCK + 2]
ACTIVE = [True, True, True, True, True, False, True]


def ragged_batch(heads: int, kv_heads: int, generator: torch.Generator) -> dict:
    """Rows of LENGTHS cached tokens on shuffled blocks; q, k, v as views into one projection output."""
    rows = len(LENGTHS)
    per_row = [-(-(length + 1) // BLOCK) for length in LENGTHS]
    width = max(per_row)
    blocks = 1 + sum(per_row) + 3
    order = (torch.randperm(blocks - 1, generator=generator) + 1).tolist()
    tables = torch.zeros(rows, width, dtype=torch.int32)
    for row, count in enumerate(per_row):
        tables[row, :count] = torch.tensor([order.pop() for _ in range(count)], dtype=torch.int32)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * HEAD_DIM, generator=generator)
    q, k, v = (part.view(rows, -1, HEAD_DIM) for part in qkv.split(
        (heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM), dim=1))
    lengths = torch.tensor(LENGTHS)
    cos, sin = (t[:, 0, 0] for t in rope_cos_sin(lengths[:, None], HEAD_DIM, 10000.0))
    keys, values = (torch.randn(blocks, BLOCK, kv_heads, HEAD_DIM, generator=generator) for _ in range(2))
    return {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "keys": keys, "values": values, "tables": tables,
            "lengths": lengths, "active": torch.tensor(ACTIVE)}


# (heads, kv_heads, split_blocks, spread): runs of 1, 3 and 64 blocks; a row's blocks spread over 4 and 3 programs
DECODE_CASES = [(heads, kv_heads, split, 1) for heads, kv_heads in ((12, 2), (4, 2)) for split in (1, 3, 64)] + [
    (12, 2, 3, 4), (4, 2, 64, 3)]
TEMPERATURES = (1.0, 0.7, 0.0)


def draw_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Nine rows over 1,000 tokens (several 256-token chunks and a partial one)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 1000, generator=generator) * 3
    logits[0, 5] = 60.0  # one row nearly one-hot
    uniform = torch.rand(9, generator=generator)
    uniform[1], uniform[2] = 0.0, 1 - 2**-24  # the first and the last token's edges
    return logits, uniform


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every case's kernel outputs, from one interpreter process: (decode inputs, outputs) by case, draw outputs
    by temperature."""
    folder = tmp_path_factory.mktemp("triton")
    batches, cases = {}, []
    for case in DECODE_CASES:
        heads, kv_heads, split, spread = case
        batch = ragged_batch(heads, kv_heads, torch.Generator().manual_seed(heads + split + spread))
        batches[case] = batch
        cases.append(("decode", (batch["q"], batch["k"], batch["v"], batch["cos"], batch["sin"], batch["keys"].clone(),
                                 batch["values"].clone(), batch["tables"], batch["lengths"], batch["active"],
                                 HEAD_DIM**-0.5, split, spread)))
    logits, uniform = draw_inputs()
    cases += [("draw", (logits, temperature, uniform, 256)) for temperature in TEMPERATURES]
    torch.save(cases, folder / "cases.pt")
    done = subprocess.run([sys.executable, str(RUNNER), str(folder / "cases.pt"), str(folder / "out.pt")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = torch.load(folder / "out.pt")
    decode = {case: (batches[case], out) for case, out in zip(DECODE_CASES, outputs)}
    return {"decode": decode, "draw": dict(zip(TEMPERATURES, outputs[len(DECODE_CASES):]))}


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"{h // k}:1-runs-of-{s}-spread-{p}" for h, k, s, p in DECODE_CASES])
def test_decode_kernel_equals_the_reference_on_ragged_rows(interpreted, case):
    batch, (out, keys, values) = interpreted["decode"][case]
    theirs = [batch["keys"].clone(), batch["values"].clone()]
    expected = paged_decode_reference(batch["q"], batch["k"], batch["v"], batch["cos"], batch["sin"], *theirs,
                                      batch["tables"], batch["lengths"], batch["active"], HEAD_DIM**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the same writes: each active row's rotated key and its value at position lengths[row], nothing else
    torch.testing.assert_close(keys, theirs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, theirs[1], rtol=0, atol=0)
    written = (keys != batch["keys"]).any(-1).any(-1).nonzero().tolist()
    assert sorted(map(tuple, written)) == sorted(
        (int(batch["tables"][row, length // BLOCK]), length % BLOCK)
        for row, (length, active) in enumerate(zip(LENGTHS, ACTIVE)) if active)


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["T1", "T0.7", "greedy"])
def test_draw_kernel_equals_sample(interpreted, temperature):
    tokens, logprobs = interpreted["draw"][temperature]
    logits, uniform = draw_inputs()
    expected_tokens, expected_logprobs = sample(logits, SamplingParams(temperature=temperature), uniform)
    assert tokens.tolist() == expected_tokens.tolist()
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=2e-6)
