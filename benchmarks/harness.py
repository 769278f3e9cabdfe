"""What the benchmark scripts share: their command line, the machine and device probes, timing, the random inputs
they measure on, and how they record and print what they measured.

- command line: `script_parser`, `fill_unset` (the values of the options left unset, e.g. under --quick);
- machine and device: `machine`, `pick_device`, `default_dtype`, `gpu_facts`, `synchronize`, `empty_cache`, and
  the bandwidth probe `copy_bandwidth`;
- timing: `timed` (one call), `best_seconds` (the best of several), `cuda_ms` (CUDA events, the median);
- inputs: `random_model`, `make_checkpoint` (random weights with a byte tokenizer), `random_letters` and
  `write_prompts` (a prompt file), `long_tailed_lengths` and `synthetic_trajectories` (a learner's batch);
- results: `keep_going` (a failing part recorded, the others measured), `write_report` (the JSON),
  `print_markdown_table` and `print_columns` (the tables), `log`.

The scripts import it as `harness`: a script's own folder comes first on sys.path (tests that import a script put
benchmarks/ there too). torch is imported inside the functions that use it, so that the host-only benchmarks
(replay queue, verifier, code sandbox) never load it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import string
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# ------------------------------------------------------------------------------------------------ command line


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a script whose --help prints its docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def fill_unset(args: argparse.Namespace, values: dict) -> None:
    """Gives each option in `values` that the command line left unset (None) its value there."""
    for option, value in values.items():
        if getattr(args, option) is None:
            setattr(args, option, value)


# ------------------------------------------------------------------------------------------ machine and device


def machine() -> dict:
    """The platform and CPU count, for a report (figures of a shared CPU depend on both)."""
    return {"machine": platform.platform(), "cpus": os.cpu_count()}


def pick_device(requested: str | None = None, tiny: bool = False):
    """`requested`, else CUDA when there is a GPU and the run is not a --tiny smoke test, else the CPU."""
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")


def default_dtype(device) -> str:
    """The model dtype on `device`: bfloat16 on CUDA (what the GPU runs use), float32 on the CPU."""
    return "bfloat16" if device.type == "cuda" else "float32"


def gpu_facts(device) -> dict:
    """The GPU's name and memory in bytes (what a one-GPU run plans its KV budget on); nothing on the CPU."""
    import torch

    if device.type != "cuda":
        return {}
    return {"device_name": torch.cuda.get_device_name(device),
            "gpu_total_bytes": torch.cuda.get_device_properties(device).total_memory}


def synchronize(device) -> None:
    """Waits for the work queued on a CUDA device (the CPU runs in order: nothing to wait for)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device) -> None:
    """Gives the CUDA caching allocator's free blocks back, so that the next part starts from the same memory."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    import torch

    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    repeats = 10
    _, seconds = timed(lambda: [target.copy_(source) for _ in range(repeats)], device)
    return 2 * nbytes * repeats / seconds


# ------------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], object], device=None) -> tuple:
    """(fn(), its wall seconds); with a `device`, its queued work is waited for before and after."""
    if device is not None:
        synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device is not None:
        synchronize(device)
    return result, time.perf_counter() - started


def best_seconds(action: Callable[[], object], device, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `action` on `device` (a transfer's floor: the least disturbed)."""
    return min(timed(action, device)[1] for _ in range(repeats))


def cuda_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median milliseconds of fn() on the GPU, between CUDA events."""
    import torch

    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------ inputs


def random_model(shape: dict, device="cpu", dtype=None, seed: int = 0, **config):
    """A CausalLM of `shape` (and `config`'s other DecoderConfig fields) with the model's own initialisation
    under `seed`, built on `device`, in `dtype` if given."""
    import torch

    from areal_async.model import CausalLM, DecoderConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(DecoderConfig(**shape, **config))
    return model if dtype is None else model.to(dtype)


def make_checkpoint(folder: Path, shape: dict, dtype) -> Path:
    """Random weights in `shape` with a byte tokenizer padded to its vocabulary, saved under `folder`."""
    from areal_async.model import save_pretrained
    from areal_async.model.tokenizer import build_byte_tokenizer, load_tokenizer

    tokenizer_dir = folder / "tokenizer"
    build_byte_tokenizer(tokenizer_dir, vocab_size=shape["vocab_size"])
    tokenizer = load_tokenizer(tokenizer_dir)
    model = random_model(shape, dtype=dtype, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_pretrained(model, folder / "model", tokenizer_dir=tokenizer_dir)


def random_letters(rng: random.Random, count: int) -> str:
    """`count` random ASCII letters: a token each with the byte tokenizer."""
    return "".join(rng.choice(string.ascii_letters) for _ in range(count))


def write_prompts(path: Path, count: int, tokens: int, seed: int) -> Path:
    """A JSONL prompt file: `count` prompts of `tokens` random letters, gold answer 42."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for index in range(count):
            f.write(json.dumps({"query_id": f"p{index}", "prompt": random_letters(rng, tokens), "answer": "42"}) + "\n")
    return path


def long_tailed_lengths(total_tokens: int, mean: int, max_len: int, seed: int) -> list[int]:
    """Lengths from a log-normal with the given mean (sigma 1), clipped to [64, max_len], until total_tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
    lengths, total = [], 0
    while total < total_tokens:
        length = int(min(max_len, max(64, math.exp(mu + sigma * torch.randn((), generator=generator).item()))))
        length = min(length, total_tokens - total) if total_tokens - total >= 64 else length
        lengths.append(length)
        total += length
    return lengths


def synthetic_trajectories(lengths: list[int], vocab_size: int, group_size: int = 4) -> list:
    """Trajectories of the given total lengths: 10% prompt (at least 32 tokens), the rest output, random tokens
    below `vocab_size`, behaviour logprobs near the policy's, rewards +-5 alternating within groups."""
    import numpy as np

    from areal_async.types import Trajectory

    rng = np.random.default_rng(0)
    trajectories = []
    for index, length in enumerate(lengths):
        prompt = min(length - 1, max(32, length // 10))
        tokens = rng.integers(0, vocab_size, size=length, dtype=np.int32)
        output = length - prompt
        trajectories.append(Trajectory(
            query_id=f"q{index // group_size}", group_id=f"g{index // group_size}", sample_index=index % group_size,
            prompt_tokens=tokens[:prompt], output_tokens=tokens[prompt:],
            behaviour_logprobs=np.full(output, -12.0, dtype=np.float32), versions=np.zeros(output, dtype=np.int32),
            reward=5.0 if index % 2 else -5.0, finish_reason="length",
        ))
    return trajectories


# ----------------------------------------------------------------------------------------------------- results


@contextlib.contextmanager
def keep_going(errors: dict, name: str):
    """Runs the block; an exception in it is printed and recorded as `errors[name]` instead of raised, so that one
    failing part does not lose the others' figures."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - recorded in the report
        traceback.print_exc()
        sys.stdout.flush()
        errors[name] = f"{type(error).__name__}: {error}"


def write_report(report: dict, out: str | Path, **json_options) -> Path:
    """Writes `report` as JSON (indent 2 unless `json_options` say otherwise) to `out`, whole or not at all."""
    from areal_async.files import write_text_atomically

    path = Path(out)
    write_text_atomically(path, json.dumps(report, **{"indent": 2, **json_options}))
    return path


def print_markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A markdown table after a blank line: the header's titles, then a line per row of cells."""
    print("\n| " + " | ".join(header) + " |", flush=True)
    print("|---" * len(header) + "|", flush=True)
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


def print_columns(columns: Sequence[tuple[str, int]], rows: Iterable[Sequence[str]]) -> None:
    """A plain-text table after a blank line: (title, width) per column, every cell right-aligned to its width."""
    print("\n" + " ".join(title.rjust(width) for title, width in columns), flush=True)
    for row in rows:
        print(" ".join(cell.rjust(width) for cell, (_, width) in zip(row, columns, strict=True)), flush=True)


def log(*parts) -> None:
    """print, flushed at once: the lines of a long run show as they come."""
    print(*parts, flush=True)
