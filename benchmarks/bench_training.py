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
Ablations of `ours` (each undoes one change, update step only):
  ours_plain_head     -- the LM head as plain autograd over 1024-row chunks (every chunk's fp32 logits kept
                         for backward) instead of the recomputing chunked Function;
  ours_flex           -- packed attention through flex_attention + document BlockMask instead of varlen flash;
  ours_fsdp_reshard   -- the one-rank FSDP settings of before: layers resharded after forward (all-gathered
                         again for backward) and a forced divide factor (an extra pass over the gradients).
MFU counts 6 x parameters (embeddings included) per token plus causal attention, against 989 TFLOP/s
(H100 SXM bf16 dense). Prints a table and writes JSON.

    python benchmarks/bench_training.py --out benchmarks/results/bench_training.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time
import traceback
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


def plain_autograd_token_logprobs(hidden, lm_head_weight, targets, temperature=1.0, chunk_size=None):
    """The LM head before the recomputing Function (ablation): plain autograd over 1024-row chunks, so every
    chunk's fp32 logits stay alive for backward."""
    lead_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    out = []
    for start in range(0, hidden.shape[0], 1024):
        logits = (hidden[start : start + 1024] @ lm_head_weight.T).float() / temperature
        picked = logits.gather(-1, targets[start : start + 1024, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(out).reshape(lead_shape)


@contextlib.contextmanager
def ours_variant(system: str):
    """Undo one change of `ours` for an ablation system, for the duration of the block."""
    from areal_async.model import decoder, logprobs
    from learners import fsdp_learner

    saved = (logprobs.token_logprobs, decoder.PACKED_ATTENTION, fsdp_learner.fully_shard,
             fsdp_learner.shard_policy)
    try:
        if system == "ours_plain_head":
            logprobs.token_logprobs = plain_autograd_token_logprobs
        elif system == "ours_flex":
            decoder.PACKED_ATTENTION = "flex"
        elif system == "ours_fsdp_reshard":
            original_fully_shard, original_policy = fsdp_learner.fully_shard, fsdp_learner.shard_policy

            def old_policy(model, mesh, activation_checkpointing=False, compile_layers=False):
                def layer_shard(module, **kwargs):  # layers: reshard after forward; the root: unchanged
                    if module is not model:
                        kwargs["reshard_after_forward"] = True
                    return original_fully_shard(module, **kwargs)

                fsdp_learner.fully_shard = layer_shard
                try:
                    result = original_policy(model, mesh, activation_checkpointing, compile_layers)
                finally:
                    fsdp_learner.fully_shard = original_fully_shard
                fsdp_learner.sum_gradients_over_ranks(model)  # the forced divide factor of before
                return result

            fsdp_learner.shard_policy = old_policy
        yield
    finally:
        (logprobs.token_logprobs, decoder.PACKED_ATTENTION, fsdp_learner.fully_shard,
         fsdp_learner.shard_policy) = saved


def ours_system(compile_layers: bool, activation_checkpointing: bool):
    """The FSDP2 learner on one GPU (a 1-rank NCCL group)."""
    import socket

    import torch.distributed as dist

    from areal_async.config import PPOConfig
    from areal_async.model import CausalLM, DecoderConfig
    from learners import fsdp_learner

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalLM(DecoderConfig(**SHAPE, tie_word_embeddings=False))
    config = PPOConfig(lr=1e-6, micro_batch_tokens=16384)
    learner = fsdp_learner.FSDPLearner(model, config, pad_token_id=0, temperature=1.0, device="cuda",
                                       activation_checkpointing=activation_checkpointing,
                                       compile_layers=compile_layers)

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


ABLATIONS = ("ours_plain_head", "ours_flex", "ours_fsdp_reshard")


def profile_step(step, label: str, out_dir: Path, rows: int = 30) -> dict:
    """One profiled step: writes the kernel table (self device time) and returns a per-category summary."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    averages = prof.key_averages()

    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    kernels = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA and device_us(e) > 0]
    categories = {"attention": ("flash", "flex", "attn", "fmha", "sdpa"), "optimizer": ("adam",),
                  "gemm": ("gemm", "cutlass", "nvjet", "xmma", "sm90", "cublas"),
                  "copy_nccl": ("memcpy", "nccl", "memset", "copy"),
                  "triton_fused": ("triton",)}
    summary = {name: 0.0 for name in categories} | {"other": 0.0}
    for event in kernels:
        key = event.key.lower()
        name = next((n for n, patterns in categories.items() if any(p in key for p in patterns)), "other")
        summary[name] += device_us(event) / 1e3
    summary = {"wall_ms_profiled": wall * 1e3, "kernel_ms": sum(device_us(e) for e in kernels) / 1e3,
               **{f"{k}_ms": v for k, v in summary.items()}}
    top = sorted(kernels, key=device_us, reverse=True)[:rows]
    lines = [f"{label}: profiled step wall {wall * 1e3:.1f} ms, kernels {summary['kernel_ms']:.1f} ms",
             "  ".join(f"{k} {v:.1f}" for k, v in summary.items())]
    lines += [f"{device_us(e) / 1e3:9.2f} ms {e.count:6d}x  {e.key[:150]}" for e in top]
    text = "\n".join(lines)
    (out_dir / f"profile_{label}.txt").write_text(text + "\n\n" + averages.table(row_limit=60) + "\n")
    print(text, flush=True)
    return summary


def selfcheck(report: dict) -> None:
    """Checks the new CUDA paths against plain references on random data before timing anything; falls back
    to flex attention if the varlen flash kernel fails or disagrees."""
    from areal_async.model import decoder
    from areal_async.model.logprobs import token_logprobs

    checks = report.setdefault("selfcheck", {})
    generator = torch.Generator(device="cuda").manual_seed(0)
    try:  # the LM head: recomputing Function against plain autograd, bf16 weights, 16384 rows
        rows, hidden_size, vocab = 16384, SHAPE["hidden_size"], SHAPE["vocab_size"]
        hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16, generator=generator)
        weight = (torch.randn(vocab, hidden_size, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
        grad = torch.randn(rows, device="cuda", generator=generator)
        results = {}
        for name, head in (("fused", token_logprobs), ("plain", plain_autograd_token_logprobs)):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            times = []
            for _ in range(3):
                h.grad = w.grad = None
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = head(h, w, targets)
                (out * grad).sum().backward()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
            results[name] = (out.detach(), h.grad.float(), w.grad.float(), sorted(times)[1],
                             (torch.cuda.max_memory_allocated() - base) / 2**30)
            del h, w, out
        (fo, fh, fw, ft, fm), (po, ph, pw, pt, pm) = results["fused"], results["plain"]
        checks["lm_head"] = {
            "rows": rows, "logprob_max_abs_diff": (fo - po).abs().max().item(),
            "grad_hidden_rel_diff": ((fh - ph).norm() / ph.norm()).item(),
            "grad_weight_rel_diff": ((fw - pw).norm() / pw.norm()).item(),
            "fused_ms": ft, "plain_ms": pt, "fused_extra_peak_gib": fm, "plain_extra_peak_gib": pm,
        }
        del results, fo, fh, fw, po, ph, pw, hidden, weight
    except Exception:  # noqa: BLE001
        checks["lm_head"] = {"error": traceback.format_exc()[-1500:]}
    torch.cuda.empty_cache()
    try:  # varlen flash attention against SDPA with the dense document mask (fp32 math), forward and backward
        heads, kv_heads, dim = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], 128
        lengths = [1000, 1537, 463, 96]
        tokens = sum(lengths)
        document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda()
        q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        k = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        v = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        grad = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = decoder.packed_flash_attention(*leaves, decoder.document_spans(document_ids))
        out.backward(grad)
        flash = [out.float()] + [t.grad.float() for t in leaves]
        ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
        mask = decoder.document_causal_mask(document_ids)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1)[None] for t in ref_leaves), attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
        ref.backward(grad.float())
        reference = [ref.detach()] + [t.grad for t in ref_leaves]
        rel = {name: ((a - b).norm() / b.norm()).item()
               for name, a, b in zip(("out", "dq", "dk", "dv"), flash, reference)}
        checks["flash_attention"] = {"rel_diff_vs_fp32": rel}
        # Kernel time on the (a) pack: 4 documents of 4096, forward + backward, one layer.
        document_ids = torch.arange(4).repeat_interleave(4096)[None].cuda()
        spans = decoder.document_spans(document_ids)
        leaves = [torch.randn(16384, h, dim, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
                  for h in (heads, kv_heads, kv_heads)]
        grad = torch.randn(16384, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        times = []
        for _ in range(5):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decoder.packed_flash_attention(*leaves, spans).backward(grad)
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        checks["flash_attention"]["pack_a_layer_fwd_bwd_ms"] = sorted(times)[2]
        if max(rel.values()) > 0.05:
            raise RuntimeError(f"varlen flash attention disagrees with the reference: {rel}")
    except Exception:  # noqa: BLE001
        checks.setdefault("flash_attention", {})["error"] = traceback.format_exc()[-1500:]
        decoder.PACKED_ATTENTION = "flex"
        checks["fallback"] = "PACKED_ATTENTION=flex"
    torch.cuda.empty_cache()
    print("selfcheck:", json.dumps(checks, indent=1), flush=True)


def measure(system: str, workload: str, args) -> list[dict]:
    sequences = workload_sequences(workload)
    lengths = [len(s) for s in sequences]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with contextlib.ExitStack() as stack:
        if system.startswith("hf"):
            make_step = hf_system(compiled=system == "hf_compile", checkpointing=system == "hf_ckpt")
            steps = [make_step(batch) for batch in hf_padded_microbatches(sequences, 16384)]
            timed = {"lm_step": lambda: [s() for s in steps]}
        else:
            stack.enter_context(ours_variant(system))  # the variant holds while the steps run
            timed = ours_system(compile_layers=system != "ours_ckpt",
                                activation_checkpointing=system == "ours_ckpt")(sequences)
            if system in ABLATIONS:
                timed = {"update": timed["update"]}
        return timed_results(system, workload, lengths, timed, args)


def timed_results(system: str, workload: str, lengths: list[int], timed: dict, args) -> list[dict]:
    """Median step time of each of `timed`'s steps, as result rows (and a profile of (a)'s update step)."""
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
        if args.profile and workload == "a" and system in ("ours", "hf_compile") and kind in ("update", "lm_step"):
            try:
                results[-1]["profile"] = profile_step(step, f"{system}_{workload}_{kind}", Path(args.out).parent)
            except Exception:  # noqa: BLE001
                print("profiling failed:", traceback.format_exc()[-800:], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["ours", "hf_ckpt", "hf_compile"])
    parser.add_argument("--workloads", nargs="+", default=["a", "b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_training.json")
    parser.add_argument("--profile", action="store_true", help="profile one (a) step of ours and hf_compile")
    parser.add_argument("--selfcheck", action="store_true", help="check the new CUDA paths first")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="skip measurements that would start after this many seconds (0: no limit)")
    args = parser.parse_args()
    started = time.perf_counter()
    try:  # the ablations rebuild the learner; keep its recompilations compiled
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except AttributeError:
        pass
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": SHAPE,
              "parameters": parameter_count(), "peak_flops": PEAK_FLOPS, "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.selfcheck:
        selfcheck(report)
        out.write_text(json.dumps(report, indent=2))
    from areal_async.model import decoder

    report["packed_attention"] = decoder.PACKED_ATTENTION
    for system in args.systems:
        for workload in (["a"] if system in ABLATIONS else args.workloads):
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                report["results"].append({"system": system, "workload": workload, "error": "skipped: time budget"})
                print(f"{system} {workload}: skipped (time budget)", flush=True)
                continue
            try:
                report["results"] += measure(system, workload, args)
            except torch.OutOfMemoryError as error:
                report["results"].append({"system": system, "workload": workload, "error": f"OOM: {error}"[:300]})
                print(f"{system} {workload}: out of memory", flush=True)
            except Exception:  # noqa: BLE001 -- one failing system must not lose the others' figures
                report["results"].append({"system": system, "workload": workload,
                                          "error": traceback.format_exc()[-2000:]})
                print(f"{system} {workload}: failed\n{traceback.format_exc()[-2000:]}", flush=True)
            report["elapsed_s"] = time.perf_counter() - started
            out.write_text(json.dumps(report, indent=2))  # after every measurement: a timeout keeps the rest
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\n{'system':>18} {'load':>4} {'step':>8} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8}")
    for r in report["results"]:
        if "error" not in r:
            print(f"{r['system']:>18} {r['workload']:>4} {r['step_kind']:>8} {r['tokens_per_s']:9.0f} {r['mfu']:6.3f} "
                  f"{r['peak_memory_gib']:8.1f}")
    print(f"written to {out} after {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
