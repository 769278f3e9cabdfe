"""Training throughput of the learner on one GPU, against transformers references in the same run.

Shape: DeepSeek-R1-Distill-Qwen-1.5B (random weights). Workloads:
  (a) 4 sequences x 4096 tokens;
  (b) packed sequences with a long-tailed length distribution (mean ~2K, max 8K tokens).
Systems:
  ours        -- the project's learner path: FSDP2 (bf16 compute, fp32 master weights and reductions),
                 compiled decoder layers, packed sequences with document masks, chunked logprobs and the
                 decoupled PPO loss, fused AdamW;
  hf_ckpt     -- transformers Qwen2ForCausalLM (SDPA, bf16 weights, fused AdamW) with gradient checkpointing;
  hf_compile  -- the same model under torch.compile, without checkpointing.
MFU counts 6 x parameters (embeddings included) per token plus causal attention, against 989 TFLOP/s
(H100 SXM bf16 dense). Prints a table and writes JSON.

    python benchmarks/bench_training.py --out benchmarks/results/bench_training.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch

PEAK_FLOPS = 989e12
SHAPE = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
)


def long_tailed_lengths(total_tokens: int, mean: int, max_len: int, seed: int) -> list[int]:
    """Lengths from a log-normal with the given mean (sigma 1), clipped to [64, max_len], until total_tokens."""
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


def parameter_count() -> int:
    h, i, layers, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"], SHAPE["vocab_size"]
    head_dim = h // SHAPE["num_attention_heads"]
    kv = SHAPE["num_key_value_heads"] * head_dim
    per_layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return 2 * v * h + layers * per_layer + h


def step_flops(lengths: list[int]) -> float:
    """6N per token plus causal attention (QK^T and AV, forward + backward = 3x forward)."""
    tokens = sum(lengths)
    attention = 3 * 2 * 2 * SHAPE["num_hidden_layers"] * SHAPE["hidden_size"] * sum(l * l / 2 for l in lengths)
    return 6 * parameter_count() * tokens + attention


def time_steps(step, warmup: int, steps: int) -> float:
    """Median seconds per step (CUDA-synchronised wall clock)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def hf_system(compiled: bool, checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPE, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    forward = torch.compile(model) if compiled else model

    def make_step(sequences: list[torch.Tensor]):
        batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0).cuda()
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True).cuda()
        labels = batch.masked_fill(mask == 0, -100)

        def step():
            loss = forward(input_ids=batch, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return make_step


def synthetic_trajectories(lengths: list[int], group_size: int = 4) -> list:
    """Trajectories of the given total lengths: 10% prompt (at least 32 tokens), the rest output, random tokens,
    behaviour logprobs near the policy's, rewards +-5 alternating within groups."""
    import numpy as np

    from areal_async.types import Trajectory

    rng = np.random.default_rng(0)
    trajectories = []
    for index, length in enumerate(lengths):
        prompt = max(32, length // 10)
        tokens = rng.integers(0, SHAPE["vocab_size"], size=length, dtype=np.int32)
        output = length - prompt
        trajectories.append(Trajectory(
            query_id=f"q{index // group_size}", group_id=f"g{index // group_size}", sample_index=index % group_size,
            prompt_tokens=tokens[:prompt], output_tokens=tokens[prompt:],
            behaviour_logprobs=np.full(output, -12.0, dtype=np.float32), versions=np.zeros(output, dtype=np.int32),
            reward=5.0 if index % 2 else -5.0, finish_reason="length",
        ))
    return trajectories


def ours_system(compile_layers: bool, activation_checkpointing: bool):
    """The FSDP2 learner on one GPU (a 1-rank NCCL group)."""
    import socket

    import torch.distributed as dist

    from areal_async.config import PPOConfig
    from areal_async.model import CausalLM, DecoderConfig
    from learners.fsdp_learner import FSDPLearner

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalLM(DecoderConfig(**SHAPE, tie_word_embeddings=False))
    config = PPOConfig(lr=1e-6, micro_batch_tokens=16384)
    learner = FSDPLearner(model, config, pad_token_id=0, temperature=1.0, device="cuda",
                          activation_checkpointing=activation_checkpointing, compile_layers=compile_layers)

    def make_steps(sequences: list[torch.Tensor]):
        from learners.ppo_learner import trajectory_advantages

        trajectories = synthetic_trajectories([len(s) for s in sequences])
        advantages = trajectory_advantages(trajectories, normalise_std=False)
        prepared = {}

        def update():  # forward + backward + optimizer step on prepared packs (what the references do)
            if "packs" not in prepared:
                prepared["packs"] = learner.prepare(trajectories, advantages)
            learner.optimizer.zero_grad(set_to_none=True)
            learner.backward(prepared["packs"])
            learner.optimizer_step()

        def full_step():  # the whole PPO step, proximal logprob recomputation included
            learner.train_step(trajectories, advantages)

        return {"update": update, "ppo_step": full_step}

    return make_steps


def workload_sequences(name: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if name == "a":
        lengths = [4096] * 4
    else:
        lengths = long_tailed_lengths(total_tokens=32768, mean=2048, max_len=8192, seed=2)
    return [torch.randint(0, SHAPE["vocab_size"], (length,), generator=generator) for length in lengths]


def hf_padded_microbatches(sequences: list[torch.Tensor], budget: int) -> list[list[torch.Tensor]]:
    """Length-sorted micro-batches whose padded size (count x longest) stays within `budget`."""
    ordered = sorted(sequences, key=len, reverse=True)
    batches, current = [], []
    for sequence in ordered:
        if current and (len(current) + 1) * len(current[0]) > budget:
            batches.append(current)
            current = []
        current.append(sequence)
    return batches + ([current] if current else [])


def measure(system: str, workload: str, args) -> list[dict]:
    sequences = workload_sequences(workload)
    lengths = [len(s) for s in sequences]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if system.startswith("hf"):
        make_step = hf_system(compiled=system == "hf_compile", checkpointing=system == "hf_ckpt")
        steps = [make_step(batch) for batch in hf_padded_microbatches(sequences, 16384)]
        timed = {"lm_step": lambda: [s() for s in steps]}
    else:
        timed = ours_system(compile_layers=system == "ours", activation_checkpointing=system == "ours_ckpt")(sequences)
    results = []
    for kind, step in timed.items():
        seconds = time_steps(step, args.warmup, args.steps)
        tokens = sum(lengths)
        results.append({
            "system": system, "workload": workload, "step_kind": kind, "sequences": len(lengths),
            "tokens": tokens, "max_len": max(lengths), "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "mfu": step_flops(lengths) / seconds / PEAK_FLOPS,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        })
        print(f"{system:>10} {workload} {kind:>8}: {tokens / seconds:9.0f} tokens/s  MFU {results[-1]['mfu']:.3f}  "
              f"peak {results[-1]['peak_memory_gib']:.1f} GiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["ours", "hf_ckpt", "hf_compile"])
    parser.add_argument("--workloads", nargs="+", default=["a", "b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_training.json")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": SHAPE,
              "parameters": parameter_count(), "peak_flops": PEAK_FLOPS, "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for system in args.systems:
        for workload in args.workloads:
            try:
                report["results"] += measure(system, workload, args)
            except torch.OutOfMemoryError as error:
                report["results"].append({"system": system, "workload": workload, "error": f"OOM: {error}"[:300]})
                print(f"{system} {workload}: out of memory", flush=True)
            out.write_text(json.dumps(report, indent=2))  # after every measurement: a timeout keeps the rest
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\n{'system':>10} {'load':>4} {'step':>8} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8}")
    for r in report["results"]:
        if "error" not in r:
            print(f"{r['system']:>10} {r['workload']:>4} {r['step_kind']:>8} {r['tokens_per_s']:9.0f} {r['mfu']:6.3f} "
                  f"{r['peak_memory_gib']:8.1f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
