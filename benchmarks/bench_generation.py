"""Generation throughput of the built-in engine (actors/engine.py) against transformers' generate, the
memory-bandwidth floor of the shape, and (--check) the engine's correctness bars on the device.

Shape: DeepSeek-R1-Distill-Qwen-1.5B (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab
151936, untied embeddings), random weights (the model's own initialisation, seed 0), bf16. Prompts are random
token ids.

Workloads of the built-in engine (sampling at temperature 1, no stop tokens):
  fixed     -- --batch requests of --prompt-len tokens, --new-tokens new tokens each, --batch slots;
  fixed_hf  -- the same with --hf-new-tokens new tokens: transformers' workload, for the same-run ratio;
  longtail  -- --longtail-requests requests (default 4 x batch) with their own token limits, drawn log-normal
               (sigma 1, mean new_tokens / 4, clipped to [16, new_tokens]), in --batch slots: finished
               slots are refilled from the waiting requests, and the tail runs on compacted smaller batches.
ours_compiled: the same engine with compile_decode=True (torch.compile of the decode forward and draw; runs
  last, since its first steps compile).
ours / ours_compiled use the slot cache's default decode attention (sdpa: SDPA per layer, eager, a graph break
  per layer under compile); ours_matmul / ours_compiled_matmul are the ablation with batched matmuls over the
  cache inside the compiled graph (measured 3% slower on an H100: benchmarks/NOTES.md).
transformers: Qwen2ForCausalLM with the same weights (SDPA, bf16, dynamic cache), generate() with sampling
  (temperature 1, top-k/top-p off), exactly --hf-new-tokens new tokens per request, on the fixed prompts.

Each timed run follows a warm-up run of the same workload (the engine captures its CUDA graphs there; the
cold time is reported too). tokens/s = output tokens / wall time of the generate call, prefill included.

Floor: a decode step must read the weights (all but the embedding table) and the KV cache of every running
sequence. Its time is those bytes over the measured copy bandwidth (bytes read + written per second by a
large device-to-device copy). A workload's floor tokens/s is its output tokens over the sum of its steps'
floors, every slot busy at every step.

--check (the correctness bars, on 32 prompts of mixed lengths, half as many slots as prompts and mixed
token limits, so refills, compaction and several graph buckets are exercised):
  greedy    -- engine greedy output against the argmax of the model's own forward pass over the same tokens
               (teacher forcing: equal at every position <=> equal to greedy decoding by the forward pass),
               in bf16 and in fp32. A mismatch is reported with the forward pass's logit gap between its
               argmax and the engine's token; one is a rounding tie when that gap is within the bound
               (bf16 0.1, fp32 1e-4).
  logprobs  -- sampled tokens' behaviour logprobs against log_softmax(logits / T) of the model's own forward
               pass at those tokens (T = 1, and T = 0.7 with top-p 0.9); bound: max |diff| <= 0.1 in bf16,
               1e-3 in fp32.
  swap      -- fp32 greedy generation with a weight swap (load_weights in place) between two decode steps:
               every token is checked against the forward pass of the weights of the version it is stamped
               with (the captured graphs must see the new weights).

    PYTHONPATH=$PWD python benchmarks/bench_generation.py --check    # JSON: results/bench_generation.json
    PYTHONPATH=$PWD python benchmarks/bench_generation.py --tiny   # CPU smoke test of every code path
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from actors.engine import TorchEngine
from actors.sampling import long_tailed_limit
from areal_async.types import SamplingParams
from areal_async.model import CausalLM, DecoderConfig
from areal_async.model.shapes import R1_DISTILL_QWEN_1_5B, TINY_BENCHMARK

SHAPE, TINY_SHAPE = R1_DISTILL_QWEN_1_5B, TINY_BENCHMARK
BOUNDS = {"bf16": {"tie": 0.1, "logprob": 0.1}, "fp32": {"tie": 1e-4, "logprob": 1e-3}}


def log(*parts) -> None:
    print(*parts, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


# --- workloads -----------------------------------------------------------------------------------------------


def random_prompts(count: int, length: int, vocab: int, seed: int, min_length: int | None = None) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [length] * count
    if min_length is not None:
        lengths = torch.randint(min_length, length + 1, (count,), generator=generator).tolist()
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def long_tailed_limits(count: int, mean: float, low: int, high: int, seed: int) -> list[int]:
    """Log-normal token limits (sigma 1) with the given mean, clipped to [low, high]."""
    return [long_tailed_limit(mean, low, high, f"{seed}:{index}") for index in range(count)]


# --- bandwidth floor ----------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    repeats = 10
    _, seconds = timed(device, lambda: [target.copy_(source) for _ in range(repeats)])
    return 2 * nbytes * repeats / seconds


def floor_tokens_per_s(model: CausalLM, prompt_lens, limits, slots: int, bandwidth: float) -> dict:
    """Tokens over the summed floors of the steps, every slot busy: per step the non-embedding weights once,
    per token generated its context's keys and values once."""
    config = model.config
    element = next(model.parameters()).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * element
    kv_per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element
    tokens = sum(limits)
    steps = tokens / slots
    kv_positions = sum(n * p + n * (n - 1) / 2 for p, n in zip(prompt_lens, limits))
    seconds = (steps * weights + kv_positions * kv_per_position) / bandwidth
    return {"tokens_per_s": tokens / seconds, "step_ms_mean": 1e3 * seconds / steps,
            "weights_gb_per_step": weights / 1e9, "kv_gb_per_step_mean": kv_positions * kv_per_position / steps / 1e9}


# --- systems ------------------------------------------------------------------------------------------------------


SYSTEMS = {  # engine systems: (compile_decode, decode_attention); "hf" is transformers' generate
    "ours": (False, "sdpa"),
    "ours_matmul": (False, "matmul"),
    "hf": None,
    "ours_compiled": (True, "sdpa"),
    "ours_compiled_matmul": (True, "matmul"),
}


def run_ours(engine: TorchEngine, prompts, limits, label: str) -> dict:
    params = SamplingParams(max_new_tokens=max(limits), temperature=1.0, seed=0)
    device = engine.device
    _, cold = timed(device, lambda: engine.generate(prompts, params, max_new_tokens=limits))
    cold_stats = dict(engine.stats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outputs, seconds = timed(device, lambda: engine.generate(prompts, params, max_new_tokens=limits))
    tokens = sum(len(o.tokens) for o in outputs)
    assert tokens == sum(limits), (tokens, sum(limits))  # no stop tokens: every request runs to its limit
    result = {
        "requests": len(prompts), "slots": engine.stats["slots"], "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "cold_seconds": cold, "stats": dict(engine.stats),
        "cold_stats": cold_stats, "decode_ms_per_step": 1e3 * seconds / max(1, engine.stats["decode_steps"]),
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"[{label}] {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s "
        f"(cold {cold:.2f} s, {engine.stats['decode_steps']} decode steps, {result['decode_ms_per_step']:.2f} "
        f"ms/step incl. prefill, graphs captured cold: {cold_stats['graph_captures']})")
    return result


def step_times(engine: TorchEngine, batch: int) -> dict:
    """Replay time of each captured graph of `batch` slots (ms), and one eager step at the longest KV bucket.
    Runs on the stale state of the last call (results are discarded; the next call resets the slots)."""
    device = engine.device
    out = {}
    keys = sorted(k for k in (engine.graphs.keys() if engine.graphs else []) if k[0] == batch)
    for key in keys:
        graph = engine.graphs.get(key)
        graph.replay()
        _, seconds = timed(device, lambda: [graph.replay() for _ in range(10)])
        out[f"graph_b{key[0]}_kv{key[1]}"] = 1e3 * seconds / 10
    if keys:
        _, kv_len, temperature, top_k, top_p = keys[-1]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        with torch.no_grad():
            engine._decode_step(batch, kv_len, params)
            _, seconds = timed(device, lambda: [engine._decode_step(batch, kv_len, params) for _ in range(3)])
        out[f"eager_b{batch}_kv{kv_len}"] = 1e3 * seconds / 3
    log("[step times ms] " + ", ".join(f"{k}: {v:.2f}" for k, v in out.items()))
    return out


def profile_steps(engine: TorchEngine, batch: int, path: Path) -> None:
    """Kernel table of three eager decode steps at the longest captured KV bucket."""
    from torch.profiler import ProfilerActivity, profile

    keys = sorted(k for k in (engine.graphs.keys() if engine.graphs else []) if k[0] == batch)
    if not keys:
        return
    _, kv_len, temperature, top_k, top_p = keys[-1]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        engine._decode_step(batch, kv_len, params)
        synchronize(engine.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine._decode_step(batch, kv_len, params)
            synchronize(engine.device)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    path.write_text(table)
    log(f"[profile] {path}")


def run_hf(model: CausalLM, prompts, new_tokens: int, device: torch.device) -> dict:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    hf_config = Qwen2Config(**model.config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        hf = Qwen2ForCausalLM(hf_config).to(dtype).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys
    ids = torch.tensor(prompts, device=device)

    def generate(count: int):
        config = GenerationConfig(max_new_tokens=count, min_new_tokens=count, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)

    timed(device, lambda: generate(min(8, new_tokens)))
    out, seconds = timed(device, lambda: generate(new_tokens))
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"[hf generate] {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s")
    return {"requests": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# --- correctness ----------------------------------------------------------------------------------------------------


def forward_logits(model: CausalLM, prompts, outputs, rows: int = 8):
    """For each request: the model's forward-pass logits (fp32) at the positions that predict its output
    tokens, [n, vocab], from one padded forward over prompt + output."""
    device = next(model.parameters()).device
    result = []
    for start in range(0, len(prompts), rows):
        seqs = [list(p) + list(o.tokens) for p, o in zip(prompts[start:start + rows], outputs[start:start + rows])]
        longest = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        valid = torch.zeros(len(seqs), longest, dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            valid[row, : len(s)] = True
        with torch.no_grad():
            logits = model(ids.to(device), valid=valid.to(device))
        for row, (p, o) in enumerate(zip(prompts[start:start + rows], outputs[start:start + rows])):
            first = len(p) - 1
            result.append(logits[row, first : first + len(o.tokens)].float())
    return result


def greedy_report(per_request_logits, outputs, tie_bound: float) -> dict:
    matches = total = 0
    gaps = []
    first_divergence = []
    for logits, output in zip(per_request_logits, outputs):
        tokens = torch.tensor(output.tokens, device=logits.device)
        best = logits.argmax(-1)
        equal = best == tokens
        matches += int(equal.sum())
        total += len(output.tokens)
        if not bool(equal.all()):
            where = (~equal).nonzero().squeeze(-1)
            first_divergence.append(int(where[0]))
            rows = torch.arange(len(tokens), device=logits.device)
            gap = (logits[rows, best] - logits[rows, tokens])[where]
            gaps += gap.tolist()
    max_gap = max(gaps) if gaps else 0.0
    return {"tokens": total, "equal": matches, "mismatches": total - matches, "max_tie_gap": max_gap,
            "first_divergence_positions": first_divergence[:10], "tie_bound": tie_bound,
            "all_equal": matches == total, "pass": max_gap <= tie_bound}


def logprob_report(per_request_logits, outputs, temperature: float, bound: float) -> dict:
    diffs = []
    for logits, output in zip(per_request_logits, outputs):
        tokens = torch.tensor(output.tokens, device=logits.device)
        recomputed = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
        diffs.append((recomputed.cpu() - torch.tensor(output.logprobs)).abs())
    diffs = torch.cat(diffs)
    return {"tokens": diffs.numel(), "max_abs_diff": float(diffs.max()), "mean_abs_diff": float(diffs.mean()),
            "bound": bound, "pass": float(diffs.max()) <= bound}


def check_workload(args, vocab: int):
    """32 prompts of mixed lengths with mixed token limits, for half as many slots."""
    count, new_tokens = args.check_prompts, args.check_new_tokens
    prompts = random_prompts(count, args.prompt_len, vocab, seed=7, min_length=max(1, args.prompt_len // 8))
    limits = torch.randint(max(1, new_tokens // 4), new_tokens + 1, (count,),
                           generator=torch.Generator().manual_seed(8)).tolist()
    return prompts, limits, max(1, count // 2)


def check_engine(engine: TorchEngine, subject: CausalLM, prompts, limits, name: str, label: str = "",
                 samplings=((1.0, 1.0), (0.7, 0.9))) -> dict:
    """Greedy and sampled generations of `engine` against `subject`'s own forward pass."""
    bounds, report = BOUNDS[name], {}
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=limits)
    report[f"greedy_{name}"] = greedy_report(forward_logits(subject, prompts, greedy), greedy, bounds["tie"])
    log(f"[check{label} greedy {name}] {report[f'greedy_{name}']}")
    for temperature, top_p in samplings:
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=9)
        sampled = engine.generate(prompts, params, max_new_tokens=limits)
        key = f"logprobs_{name}_T{temperature}_p{top_p}"
        report[key] = logprob_report(forward_logits(subject, prompts, sampled), sampled, temperature,
                                     bounds["logprob"])
        log(f"[check{label} {key}] {report[key]}")
    return report


def run_check(model: CausalLM, args, device: torch.device, vocab: int) -> dict:
    prompts, limits, slots = check_workload(args, vocab)
    report = {"prompts": len(prompts), "slots": slots, "max_new_tokens": args.check_new_tokens}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        subject = model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype)
        engine = TorchEngine(subject, pad_token_id=0, device=device, max_slots=slots, kv_bucket=args.kv_bucket,
                             compile_decode=False)
        report.update(check_engine(engine, subject, prompts, limits, name))
        if name == "fp32":
            report["swap_fp32"] = swap_check(subject, engine, prompts, limits)
            log(f"[check swap fp32] {report['swap_fp32']}")
        del engine
        if subject is not model:
            del subject
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["pass"] = all(v["pass"] for k, v in report.items() if isinstance(v, dict) and "pass" in v)
    return report


def swap_check(subject: CausalLM, engine: TorchEngine, prompts, limits) -> dict:
    """Greedy generation with a weight swap at the 40th token boundary (prefills included): every token must
    be the argmax of the forward pass of its stamped version's weights."""
    old = copy.deepcopy(subject)
    generator = torch.Generator(device=next(subject.parameters()).device).manual_seed(3)
    new_state = {n: p.detach() + 0.02 * torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                 for n, p in subject.named_parameters()}
    calls = []
    engine.version = 0

    def swap() -> bool:
        calls.append(None)
        if len(calls) == 40:
            engine.load_weights(new_state, version=1)
            return True
        return False

    outputs = engine.generate(prompts, SamplingParams(temperature=0.0), weight_update=swap, max_new_tokens=limits)
    before, after = forward_logits(old, prompts, outputs), forward_logits(subject, prompts, outputs)
    mismatches = total = 0
    gaps = []
    for lo, hi, output in zip(before, after, outputs):
        versions = torch.tensor(output.versions, device=lo.device)
        logits = torch.where((versions == 0)[:, None], lo, hi)
        tokens = torch.tensor(output.tokens, device=lo.device)
        best = logits.argmax(-1)
        wrong = best != tokens
        mismatches += int(wrong.sum())
        total += len(tokens)
        rows = torch.arange(len(tokens), device=lo.device)
        gaps += (logits[rows, best] - logits[rows, tokens])[wrong].tolist()
    versions = [v for o in outputs for v in o.versions]
    del old
    max_gap = max(gaps) if gaps else 0.0
    return {"tokens": total, "mismatches": mismatches, "max_tie_gap": max_gap,
            "tokens_v0": versions.count(0), "tokens_v1": versions.count(1), "recomputes": engine.stats["recomputes"],
            "pass": max_gap <= BOUNDS["fp32"]["tie"] and versions.count(1) > 0 and versions.count(0) > 0}


# --- main -------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="slots (and requests of the fixed workloads)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--hf-new-tokens", type=int, default=256)
    parser.add_argument("--longtail-requests", type=int, default=None, help="default: 4 x batch")
    parser.add_argument("--variants", nargs="+", default=["fixed", "fixed_hf", "longtail"],
                        choices=["fixed", "fixed_hf", "longtail"])
    parser.add_argument("--systems", nargs="+", default=["ours", "hf", "ours_compiled"],
                        choices=list(SYSTEMS))
    parser.add_argument("--check", action="store_true", help="run the correctness bars")
    parser.add_argument("--check-prompts", type=int, default=32)
    parser.add_argument("--check-new-tokens", type=int, default=128)
    parser.add_argument("--kv-bucket", type=int, default=64)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="kernel table of eager decode steps")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and workload on CPU (smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip sections once this much has passed")
    parser.add_argument("--out", default="results/bench_generation.json")
    args = parser.parse_args()
    started = time.perf_counter()
    shape = SHAPE
    if args.tiny:
        shape = TINY_SHAPE
        args.batch, args.prompt_len, args.new_tokens, args.hf_new_tokens = 8, 16, 48, 16
        args.check_prompts, args.check_new_tokens, args.kv_bucket = 8, 24, 16
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict = {"args": vars(args), "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                    "results": {}, "errors": {}}
    if device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    log(f"device {report.get('device_name', device)}, torch {torch.__version__}, dtype {dtype}")

    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(DecoderConfig(**shape))
    model = model.to(dtype).eval()
    vocab = shape["vocab_size"]
    results, errors = report["results"], report["errors"]

    def section(name: str, fn):
        if time.perf_counter() - started > args.budget_s:
            log(f"[{name}] skipped: past the {args.budget_s:.0f} s budget")
            errors[name] = "skipped (time budget)"
            return None
        try:
            value = fn()
            results[name] = value
            return value
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            sys.stdout.flush()
            errors[name] = f"{type(error).__name__}: {error}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    bandwidth = section("copy_bandwidth_gb_s", lambda: copy_bandwidth(device) / 1e9)
    log(f"[bandwidth] {bandwidth:,.0f} GB/s (read + write)" if bandwidth else "[bandwidth] failed")
    fixed_prompts = random_prompts(args.batch, args.prompt_len, vocab, seed=1)
    requests = args.longtail_requests or 4 * args.batch
    workloads = {
        "fixed": (fixed_prompts, [args.new_tokens] * args.batch),
        "fixed_hf": (fixed_prompts, [args.hf_new_tokens] * args.batch),
        "longtail": (random_prompts(requests, args.prompt_len, vocab, seed=2),
                     long_tailed_limits(requests, args.new_tokens / 4, 16, args.new_tokens, seed=3)),
    }
    if bandwidth:
        for name in args.variants:
            prompts, limits = workloads[name]
            results[f"floor_{name}"] = floor_tokens_per_s(model, [len(p) for p in prompts], limits, args.batch,
                                                           bandwidth * 1e9)
            log(f"[floor {name}] {results[f'floor_{name}']}")

    def run_engine(label: str) -> None:
        compile_decode, attention = SYSTEMS[label]
        engine = TorchEngine(model, pad_token_id=0, device=device, max_slots=args.batch,
                             sync_every=args.sync_every, kv_bucket=args.kv_bucket, compile_decode=compile_decode,
                             decode_attention=attention)
        for name in args.variants:
            prompts, limits = workloads[name]
            section(f"{label}_{name}", lambda: run_ours(engine, prompts, limits, f"{label} {name}"))
        if "fixed" in args.variants or "fixed_hf" in args.variants:
            section(f"step_ms_{label}", lambda: step_times(engine, args.batch))
        if engine._state is not None:
            results[f"fp32_scores_{label}"] = engine._state.cache.fp32_scores
        if args.profile and args.out and label == "ours":
            section("profile", lambda: profile_steps(engine, args.batch, Path(args.out).with_suffix(".profile.txt")))
        engine.release()
        if args.check and label == "ours_compiled":  # compiled kernels round differently
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            prompts, limits, slots = check_workload(args, vocab)
            checker = TorchEngine(model, pad_token_id=0, device=device, max_slots=slots, kv_bucket=args.kv_bucket,
                                  compile_decode=True, decode_attention=attention)

            def check_compiled() -> dict:
                report = check_engine(checker, model, prompts, limits, name, " compiled", samplings=((1.0, 1.0),))
                report["pass"] = all(v["pass"] for v in report.values())
                return report

            section(f"check_{label}", check_compiled)
            checker.release()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for label in ("ours", "ours_matmul"):
        if label in args.systems:
            run_engine(label)
    if "hf" in args.systems:
        section("hf_fixed_hf", lambda: run_hf(model, fixed_prompts, args.hf_new_tokens, device))
    if args.check:
        section("check", lambda: run_check(model, args, device, vocab))
    for label in ("ours_compiled", "ours_compiled_matmul"):  # last: their first steps compile (tens of seconds)
        if label in args.systems:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            run_engine(label)

    hf = results.get("hf_fixed_hf")
    engines = [label for label, system in SYSTEMS.items() if system is not None]
    for label in engines:
        ours = results.get(f"{label}_fixed_hf")
        if ours and hf:
            results[f"ratio_{label}_over_hf_same_workload"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    report["wall_s"] = time.perf_counter() - started

    log("\n| system | workload | tokens | seconds | tokens/s | floor tokens/s | of floor |")
    log("|---|---|---|---|---|---|---|")
    for name in ("fixed", "fixed_hf", "longtail"):
        floor = results.get(f"floor_{name}", {}).get("tokens_per_s")
        for system in (*engines, "hf"):
            row = results.get(f"{system}_{name}")
            if row:
                floor_text, share = (f"{floor:,.0f}", f"{row['tokens_per_s'] / floor:.2f}") if floor else ("-", "-")
                log(f"| {system} | {name} ({row['requests']} requests) | {row['tokens']} | {row['seconds']:.2f} | "
                    f"{row['tokens_per_s']:,.0f} | {floor_text} | {share} |")
    for label in engines:
        if f"ratio_{label}_over_hf_same_workload" in results:
            log(f"{label} / transformers on the same workload: "
                f"{results[f'ratio_{label}_over_hf_same_workload']:.1f} x")
    for key in ("check", "check_ours_compiled"):
        if key in results:
            log(f"{key} pass: {results[key]['pass']}")
    if errors:
        log(f"errors: {errors}")
    log(f"wall {report['wall_s']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
