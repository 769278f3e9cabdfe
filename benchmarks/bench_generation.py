"""Generation throughput of the built-in engine (actors/engine.py) against transformers' generate and the
memory-bandwidth floor of the shape, and (--check) the engine's correctness bars on the device.

Shape: DeepSeek-R1-Distill-Qwen-1.5B (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab
151936, untied embeddings), random weights (the model's own initialisation, seed 0), bf16. Prompts are random
token ids; no stop tokens, so every request runs to its own token limit.

Workloads (sampling at temperature 1), each through --max-slots slots (default --batch):
  fixed     -- --batch requests of --prompt-len tokens, --new-tokens new tokens each;
  fixed_hf  -- the same with --hf-new-tokens new tokens: transformers' workload, for the same-run ratio;
  longtail  -- --longtail-requests requests (default 4 x batch) with their own token limits, drawn log-normal
               (sigma 1, mean new_tokens / 4, clipped to [16, new_tokens]);
  stage1    -- the seed's first stage: --stage1-requests requests (default 1,024) in groups of 16 sharing a prompt
               of 256 tokens, limits log-normal with mean 2,048 capped at 8,192;
  stage3    -- the seed's third stage: --stage3-requests requests (default 512) in groups of 8 sharing a prompt of
               256 tokens, limits log-normal with mean 6,000 capped at 24,000.
The engine's KV pool is --kv-gib (default: 40 GiB on a GPU of 80 GB or less, 60 GiB on a larger one).

Systems: ours (the decode forward eager, replayed as CUDA graphs), ours_compiled (the engine's default on CUDA:
the decode forward through torch.compile), ours_compiled_plain (compiled, without the fused draw kernel and the
fused q/k/v and gate/up projections: the ablation of those two), hf (transformers' generate: Qwen2ForCausalLM with
the same weights, SDPA, dynamic cache, exactly --hf-new-tokens new tokens per request on the fixed prompts).

Each timed run follows a warm-up: `TorchEngine.reserve` sizes the buffers and KV pool for the workload and
captures the decode step of every batch size (compiling it first), then one call on the same prompts with
token limits cut to 32 runs the prefill paths; the timed call neither reallocates nor captures a graph.
cold_start_s: building a system's engine plus its first warm-up (a fresh process's first system is cold:
nothing compiled or cached yet), split into the build, `reserve` (compiling, capturing) and the first call, with
dynamo's table of compile times. tokens/s = output tokens / wall time of the
timed generate call, prefills included.

Floor: a decode step must read the weights (all but the embedding table) and the KV cache of every running
sequence. Its time is those bytes over the measured copy bandwidth (bytes read + written per second by a
large device-to-device copy). A workload's floor tokens/s is its output tokens over the sum of its steps'
floors, min(requests, --max-slots) sequences busy at every step, each reading only the KV it holds (prompt +
tokens so far).

--check (the correctness bars, with prompt blocks shared and the KV pool small enough to preempt: --check-prompts
requests in groups of 4 sharing a prompt, mixed prompt lengths and token limits, half as many slots as
requests):
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
               with (the captured graphs must see the new weights; shared prompts are recomputed once).
  shared    -- fp32 samples with shared prompt blocks against the same requests with sharing off: equal tokens,
               logprobs within 1e-5.
  kernel    -- the Triton decode kernel against the gather reference on ragged rows (bf16 and fp32).

    PYTHONPATH=$PWD python benchmarks/bench_generation.py --check    # JSON: results/bench_generation.json
    PYTHONPATH=$PWD python benchmarks/bench_generation.py --tiny   # CPU smoke test of every code path
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from actors.engine import TorchEngine
from actors.sampling import long_tailed_limit
from areal_async.model import CausalLM
from areal_async.model.paged_cache import blocks_for, kv_block_bytes
from areal_async.model.shapes import R1_DISTILL_QWEN_1_5B, TINY_BENCHMARK
from areal_async.types import SamplingParams
from harness import (copy_bandwidth, default_dtype, empty_cache, gpu_facts, keep_going, log, pick_device,
                     print_markdown_table, random_model, script_parser, synchronize, timed, write_report)

SHAPE, TINY_SHAPE = R1_DISTILL_QWEN_1_5B, TINY_BENCHMARK
BOUNDS = {"bf16": {"tie": 0.1, "logprob": 0.1}, "fp32": {"tie": 1e-4, "logprob": 1e-3}}
WARMUP_TOKENS = 32
# the seed's stages: (group size, prompt tokens, mean and cap of the token limits)
STAGES = {"stage1": (16, 256, 2048, 8192), "stage3": (8, 256, 6000, 24000)}
VARIANTS = ("fixed", "fixed_hf", "longtail", "stage1", "stage3")
SYSTEMS = {  # engine options per system; "hf" is transformers' generate
    "ours": dict(compile_decode=False, compile_prefill=False),  # no torch.compile: the elementwise Triton kernels
    "ours_compiled": dict(compile_decode=True, compile_prefill=True),
    "ours_compiled_plain": dict(compile_decode=True, compile_prefill=True, fused_sampling=False,
                                fuse_projections=False),
    "hf": None,
}


# --- workloads -----------------------------------------------------------------------------------------------


def random_prompts(count: int, length: int, vocab: int, seed: int, min_length: int | None = None) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [length] * count
    if min_length is not None:
        lengths = torch.randint(min_length, length + 1, (count,), generator=generator).tolist()
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def grouped_prompts(count: int, group: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` requests in consecutive groups of `group` with the same random prompt."""
    distinct = random_prompts(-(-count // group), length, vocab, seed)
    return [distinct[index // group] for index in range(count)]


def long_tailed_limits(count: int, mean: float, low: int, high: int, seed: int) -> list[int]:
    """Log-normal token limits (sigma 1) with the given mean, clipped to [low, high]."""
    return [long_tailed_limit(mean, low, high, f"{seed}:{index}") for index in range(count)]


def workload(name: str, args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, token limits) of workload `name`."""
    if name in ("fixed", "fixed_hf"):
        new_tokens = args.new_tokens if name == "fixed" else args.hf_new_tokens
        return random_prompts(args.batch, args.prompt_len, vocab, seed=1), [new_tokens] * args.batch
    if name == "longtail":
        requests = args.longtail_requests or 4 * args.batch
        return (random_prompts(requests, args.prompt_len, vocab, seed=2),
                long_tailed_limits(requests, args.new_tokens / 4, 16, args.new_tokens, seed=3))
    group, prompt_len, mean, cap = STAGES[name]
    requests = args.stage1_requests if name == "stage1" else args.stage3_requests
    if args.tiny:
        prompt_len, mean, cap = 12, 24, 64
    return (grouped_prompts(requests, group, prompt_len, vocab, seed=4),
            long_tailed_limits(requests, mean, 16, cap, seed=5))


# --- bandwidth floor ----------------------------------------------------------------------------------------------


def floor_tokens_per_s(model: CausalLM, prompt_lens, limits, slots: int, bandwidth: float) -> dict:
    """Tokens over the summed floors of the steps, every slot busy: per step the non-embedding weights once,
    per token generated its own context's keys and values once."""
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


def make_engine(model: CausalLM, args, device: torch.device, **options) -> TorchEngine:
    return TorchEngine(model, pad_token_id=0, device=device, max_slots=args.max_slots, sync_every=args.sync_every,
                       kv_block_size=args.block_size, kv_memory_gib=args.kv_gib,
                       decode_split_tokens=args.split_tokens, **options)


def run_ours(engine: TorchEngine, prompts, limits, label: str) -> dict:
    params = SamplingParams(max_new_tokens=max(limits), temperature=1.0, seed=0)
    device = engine.device
    started = time.perf_counter()
    engine.reserve(max(len(p) + n for p, n in zip(prompts, limits)), max(limits), params)
    synchronize(device)
    reserve_s = time.perf_counter() - started
    engine.generate(prompts, params, max_new_tokens=[min(n, WARMUP_TOKENS) for n in limits])
    synchronize(device)
    warmup_s = time.perf_counter() - started
    warmup_stats = dict(engine.stats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outputs, seconds = timed(lambda: engine.generate(prompts, params, max_new_tokens=limits), device)
    tokens = sum(len(o.tokens) for o in outputs)
    assert tokens == sum(limits), (tokens, sum(limits))  # no stop tokens: every request runs to its limit
    stats = dict(engine.stats)
    result = {
        "requests": len(prompts), "slots": stats["slots"], "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "warmup_s": warmup_s, "warmup_reserve_s": reserve_s, "stats": stats, "warmup_stats": warmup_stats,
        "decode_ms_per_step": 1e3 * seconds / max(1, stats["decode_steps"]), "peak_kv_gib": stats["peak_kv_gib"],
        "in_flight_mean": stats["in_flight_mean"], "in_flight_max": stats["in_flight_max"],
        "preemptions": stats["preemptions"],
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"[{label}] {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s (warm-up {warmup_s:.1f} s, "
        f"{stats['decode_steps']} decode steps, {result['decode_ms_per_step']:.2f} ms/step incl. prefill; in flight "
        f"mean {stats['in_flight_mean']:.0f} max {stats['in_flight_max']}; peak KV {stats['peak_kv_gib']:.1f} GiB; "
        f"{stats['preemptions']} preemptions; graphs captured in the timed call: {stats['graph_captures']})")
    return result


def _fill_rows(engine: TorchEngine, batch: int, length: int) -> bool:
    """Sets slots 0 .. batch-1 running at `length` cached tokens on distinct blocks (for step timing); False when
    the pool cannot hold them."""
    state = engine._state
    per_row = blocks_for(length + 16, engine.block_size)
    if batch * per_row > state.cache.num_blocks - 1 or per_row > state.width:
        return False
    state.tables[:batch, :per_row] = torch.arange(1, 1 + batch * per_row, dtype=torch.int32,
                                                  device=engine.device).view(batch, per_row)
    state.lengths[:batch] = length
    state.active[:batch] = True
    state.generated[:batch] = 0
    state.limit[:batch] = 2**30
    state.stop_ids.fill_(-1)
    return True


def step_times(engine: TorchEngine, batch: int, lengths=(128, 512, 1024, 2048, 4096)) -> dict:
    """Replay time (ms) of the captured step of `batch` slots with every slot at each of `lengths` cached
    tokens (keys graph_b<batch>_kv<length>: the simulator's decode-cost fit reads them)."""
    device = engine.device
    graph = engine.graphs.get((batch, 1.0, 0, 1.0)) if engine.graphs else None
    out = {}
    if graph is None:
        return out
    for length in lengths:
        if not _fill_rows(engine, batch, length):
            continue
        graph.replay()
        _, seconds = timed(lambda: [graph.replay() for _ in range(10)], device)
        out[f"graph_b{batch}_kv{length}"] = 1e3 * seconds / 10
    log("[step times ms] " + ", ".join(f"{k}: {v:.2f}" for k, v in out.items()))
    return out


def profile_steps(engine: TorchEngine, batch: int, path: Path, length: int = 1024) -> None:
    """Kernel table of three eager decode steps of `batch` slots at `length` cached tokens."""
    from torch.profiler import ProfilerActivity, profile

    if engine._state is None or not _fill_rows(engine, batch, length):
        return
    params = SamplingParams(temperature=1.0)
    with torch.no_grad():
        engine._decode_step(batch, params)
        synchronize(engine.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine._decode_step(batch, params)
            synchronize(engine.device)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
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

    timed(lambda: generate(min(8, new_tokens)), device)
    out, seconds = timed(lambda: generate(new_tokens), device)
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del hf
    empty_cache(device)
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
    """--check-prompts requests in groups of 4 sharing a prompt of mixed length, mixed token limits, for half as
    many slots."""
    count, new_tokens = args.check_prompts, args.check_new_tokens
    distinct = random_prompts(-(-count // 4), args.prompt_len, vocab, seed=7, min_length=max(1, args.prompt_len // 8))
    prompts = [distinct[index // 4] for index in range(count)]
    limits = torch.randint(max(1, new_tokens // 4), new_tokens + 1, (count,),
                           generator=torch.Generator().manual_seed(8)).tolist()
    return prompts, limits, max(1, count // 2)


def check_pool_gib(model: CausalLM, block_size: int, prompts, limits, slots: int) -> float:
    """A KV budget of a quarter of what `slots` sequences of the longest request need: the pool runs dry and
    preempts."""
    block = kv_block_bytes(model.config, block_size, next(model.parameters()).dtype)
    longest = max(len(p) + n for p, n in zip(prompts, limits))
    return (slots * blocks_for(longest, block_size) // 4 + 2) * block / 2**30


def check_engine(engine: TorchEngine, subject: CausalLM, prompts, limits, name: str, label: str = "",
                 samplings=((1.0, 1.0), (0.7, 0.9))) -> dict:
    """Greedy and sampled generations of `engine` against `subject`'s own forward pass."""
    bounds, report = BOUNDS[name], {}
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=limits)
    report[f"greedy_{name}"] = greedy_report(forward_logits(subject, prompts, greedy), greedy, bounds["tie"])
    _mark_active(report[f"greedy_{name}"], engine.stats)
    log(f"[check{label} greedy {name}] {report[f'greedy_{name}']}")
    for temperature, top_p in samplings:
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=9)
        sampled = engine.generate(prompts, params, max_new_tokens=limits)
        key = f"logprobs_{name}_T{temperature}_p{top_p}"
        report[key] = logprob_report(forward_logits(subject, prompts, sampled), sampled, temperature,
                                     bounds["logprob"])
        _mark_active(report[key], engine.stats)
        log(f"[check{label} {key}] {report[key]}")
    return report


def _mark_active(row: dict, stats: dict) -> None:
    """Records that the run preempted and shared prompt blocks: a check passes only with both active."""
    row.update(preemptions=stats["preemptions"], shared_prompt_blocks=stats["shared_prompt_blocks"])
    row["pass"] = row["pass"] and stats["preemptions"] > 0 and stats["shared_prompt_blocks"] > 0


def shared_check(subject: CausalLM, device, prompts, limits, slots: int, kv_gib: float, block: int) -> dict:
    """fp32 greedy decoding with prompt blocks shared against the same requests with sharing off: equal token for
    token. (Sampled tokens are not compared: the two runs prefill in batches of other shapes, and fp32
    rounding moves an inverse-CDF draw over 151,936 near-flat probabilities to a neighbour token now and
    then; the sampled logprobs of the shared run are checked against recomputation instead.)"""
    runs = {}
    for share in (True, False):
        engine = TorchEngine(subject, pad_token_id=0, device=device, max_slots=slots, kv_block_size=block,
                             kv_memory_gib=kv_gib, compile_decode=False, share_prompts=share)
        runs[share] = (engine.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=limits),
                       dict(engine.stats))
        del engine
    (shared, shared_stats), (alone, alone_stats) = runs[True], runs[False]
    equal = sum(a.tokens == b.tokens for a, b in zip(shared, alone))
    return {"requests": len(prompts), "equal_requests": equal,
            "tokens": sum(len(g.tokens) for g in shared), "shared_prompt_blocks": shared_stats["shared_prompt_blocks"],
            "preemptions_shared": shared_stats["preemptions"], "preemptions_unshared": alone_stats["preemptions"],
            "pass": equal == len(prompts) and shared_stats["shared_prompt_blocks"] > 0}


def kernel_check(device: torch.device) -> dict:
    """The Triton decode kernel and draw kernel against their references on the device."""
    from actors.sampling import sample
    from actors.sampling_triton import fused_sample
    from areal_async.model.decoder import rope_cos_sin
    from areal_async.model.paged_cache import paged_decode_reference
    from areal_async.model.paged_decode_triton import paged_decode_attention

    report, generator = {}, torch.Generator(device=device).manual_seed(21)
    lengths = torch.tensor([0, 1, 63, 64, 65, 700, 4000, 9000, 300, 2], device=device)
    active = torch.ones_like(lengths, dtype=torch.bool)
    active[-1] = False
    block, kv_heads, head_dim, heads = 64, 2, 128, 12
    width = blocks_for(int(lengths.max()) + 1, block)
    blocks = 1 + len(lengths) * width
    tables = (torch.randperm(blocks - 1, generator=generator, device=device)[: len(lengths) * width] + 1)
    tables = tables.view(len(lengths), width).to(torch.int32)
    cos, sin = (t[:, 0, 0] for t in rope_cos_sin(lengths[:, None], head_dim, 10000.0))
    for name, dtype, bound in (("bf16", torch.bfloat16, 1e-2), ("fp32", torch.float32, 1e-5)):
        keys, values = (torch.randn(blocks, block, kv_heads, head_dim, generator=generator, device=device).to(dtype)
                        for _ in range(2))
        qkv = torch.randn(len(lengths), (heads + 2 * kv_heads) * head_dim, generator=generator, device=device)
        q, k_new, v_new = (part.view(len(lengths), -1, head_dim) for part in qkv.to(dtype).split(
            (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=1))
        for split, spread in ((1, 1), (8, 1), (16, 8)):
            ours_keys, ours_values = keys.clone(), values.clone()
            out = paged_decode_attention(q, k_new, v_new, cos, sin, ours_keys, ours_values, tables, lengths, active,
                                         head_dim**-0.5, split, spread)
            ref_keys = keys.float().clone()
            ref = paged_decode_reference(q.float(), k_new.float(), v_new.float(), cos, sin, ref_keys,
                                         values.float().clone(), tables, lengths, active, head_dim**-0.5)
            error = float((out.float() - ref).norm() / ref.norm())
            key_error = float((ours_keys.float() - ref_keys).abs().max())  # the new keys, rotated and written
            report[f"decode_{name}_split{split}_spread{spread}"] = {"relative_error": error, "bound": bound,
                                                     "cache_write_max_error": key_error,
                                                     "pass": error <= bound and key_error <= 2 * bound}
    logits = torch.randn(64, 151936, generator=generator, device=device).to(torch.bfloat16) * 4
    uniform = torch.rand(64, generator=generator, device=device)
    for temperature in (1.0, 0.6, 0.0):
        tokens, logprobs = fused_sample(logits, temperature, uniform)
        ref_tokens, ref_logprobs = sample(logits, SamplingParams(temperature=temperature), uniform)
        equal = int((tokens == ref_tokens).sum())
        gap = float((logprobs - ref_logprobs).abs().max())
        report[f"draw_T{temperature}"] = {"equal_tokens": equal, "rows": 64, "max_logprob_gap": gap,
                                          "pass": equal >= 63 and gap <= 1e-4}
    report["pass"] = all(v["pass"] for v in report.values())
    log(f"[check kernels] {report}")
    return report


def run_check(model: CausalLM, args, device: torch.device, vocab: int) -> dict:
    prompts, limits, slots = check_workload(args, vocab)
    report = {"prompts": len(prompts), "slots": slots, "max_new_tokens": args.check_new_tokens}
    if device.type == "cuda":
        report["kernels"] = kernel_check(device)
    block = min(args.block_size, 16)  # small blocks: sequences grow into new ones often, and the pool runs dry
    report["block_size"] = block
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        subject = model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype)
        kv_gib = check_pool_gib(subject, block, prompts, limits, slots)
        engine = TorchEngine(subject, pad_token_id=0, device=device, max_slots=slots, kv_block_size=block,
                             kv_memory_gib=kv_gib, compile_decode=False)
        report.update(check_engine(engine, subject, prompts, limits, name))
        if name == "fp32":
            report["swap_fp32"] = swap_check(subject, engine, prompts, limits)
            _mark_active(report["swap_fp32"], engine.stats)
            log(f"[check swap fp32] {report['swap_fp32']}")
            report["shared_fp32"] = shared_check(subject, device, prompts, limits, slots, kv_gib, block)
            log(f"[check shared fp32] {report['shared_fp32']}")
        del engine
        if subject is not model:
            del subject
        empty_cache(device)
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


def default_kv_gib(device: torch.device) -> float | None:
    """40 GiB on a GPU of 80 GB or less, 60 GiB on a larger one; no budget on a CPU."""
    if device.type != "cuda":
        return None
    return 60.0 if torch.cuda.get_device_properties(device).total_memory > 100 * 2**30 else 40.0


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--batch", type=int, default=256, help="requests of the fixed workloads")
    parser.add_argument("--max-slots", type=int, default=None, help="sequences decoded at once (default: --batch)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--hf-new-tokens", type=int, default=256)
    parser.add_argument("--longtail-requests", type=int, default=None, help="default: 4 x batch")
    parser.add_argument("--stage1-requests", type=int, default=1024)
    parser.add_argument("--stage3-requests", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=["fixed", "fixed_hf", "longtail"], choices=VARIANTS)
    parser.add_argument("--systems", nargs="+", default=["ours_compiled", "hf"], choices=list(SYSTEMS))
    parser.add_argument("--kv-gib", type=float, default=None, help="the KV pool (default: by the GPU's memory)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--split-tokens", type=int, default=1024)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="run the correctness bars")
    parser.add_argument("--check-prompts", type=int, default=32)
    parser.add_argument("--check-new-tokens", type=int, default=128)
    parser.add_argument("--step-times", action="store_true", help="graph replay times by KV length (simulator fit)")
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
        args.stage1_requests, args.stage3_requests = 32, 16
        args.check_prompts, args.check_new_tokens, args.block_size = 8, 24, 4
    args.max_slots = args.max_slots or args.batch
    device = pick_device(args.device, args.tiny)
    dtype = getattr(torch, default_dtype(device))
    if args.kv_gib is None:
        args.kv_gib = default_kv_gib(device)
    report: dict = {"args": vars(args), "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                    "results": {}, "errors": {}, **gpu_facts(device)}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    log(f"device {report.get('device_name', device)}, torch {torch.__version__}, dtype {dtype}, KV pool "
        f"{args.kv_gib} GiB")

    model = random_model(shape, device, dtype).eval()
    vocab = shape["vocab_size"]
    results, errors = report["results"], report["errors"]

    def section(name: str, fn):
        if time.perf_counter() - started > args.budget_s:
            log(f"[{name}] skipped: past the {args.budget_s:.0f} s budget")
            errors[name] = "skipped (time budget)"
            return None
        with keep_going(errors, name):  # one failing section must not lose the others
            results[name] = fn()
            return results[name]
        empty_cache(device)
        return None

    bandwidth = section("copy_bandwidth_gb_s", lambda: copy_bandwidth(device) / 1e9)
    log(f"[bandwidth] {bandwidth:,.0f} GB/s (read + write)" if bandwidth else "[bandwidth] failed")
    loads = {name: workload(name, args, vocab) for name in args.variants}
    if bandwidth:
        for name, (prompts, limits) in loads.items():
            results[f"floor_{name}"] = floor_tokens_per_s(model, [len(p) for p in prompts], limits,
                                                           min(len(prompts), args.max_slots), bandwidth * 1e9)
            log(f"[floor {name}] {results[f'floor_{name}']}")

    def run_engine(label: str) -> None:
        build_started = time.perf_counter()
        engine = make_engine(model, args, device, **SYSTEMS[label])
        build_s = time.perf_counter() - build_started
        for index, name in enumerate(args.variants):
            prompts, limits = loads[name]
            row = section(f"{label}_{name}", lambda: run_ours(engine, prompts, limits, f"{label} {name}"))
            if row is not None and index == 0:
                results[f"cold_start_s_{label}"] = build_s + row["warmup_s"]
                log(f"[{label}] cold start {results[f'cold_start_s_{label}']:.1f} s ({name}: build {build_s:.1f}, "
                    f"reserve {row['warmup_reserve_s']:.1f}, first call {row['warmup_s'] - row['warmup_reserve_s']:.1f})")
                # where compiling spent the cold start: dynamo's per-function table (seconds per phase)
                results[f"compile_times_{label}"] = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
                log(results[f"compile_times_{label}"])
        if args.step_times:
            section(f"step_ms_{label}", lambda: {key: value for batch in sorted({args.max_slots, 64, 16})
                                                 for key, value in step_times(engine, batch).items()})
        if args.profile and args.out and label == "ours_compiled":
            section("profile", lambda: profile_steps(engine, args.max_slots, Path(args.out).with_suffix(".profile.txt")))
        engine.release()
        del engine
        empty_cache(device)

    for label in args.systems:
        if label == "hf":
            prompts, _ = workload("fixed_hf", args, vocab)
            section("hf_fixed_hf", lambda: run_hf(model, prompts, args.hf_new_tokens, device))
        else:
            run_engine(label)
    if args.check:
        section("check", lambda: run_check(model, args, device, vocab))

    hf = results.get("hf_fixed_hf")
    engines = [label for label, system in SYSTEMS.items() if system is not None]
    for label in engines:
        ours = results.get(f"{label}_fixed_hf")
        if ours and hf:
            results[f"ratio_{label}_over_hf_same_workload"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    report["wall_s"] = time.perf_counter() - started

    rows = []
    for name in VARIANTS:
        floor = results.get(f"floor_{name}", {}).get("tokens_per_s")
        for system in SYSTEMS:
            row = results.get(f"{system}_{name}")
            if not row:
                continue
            floor_text, share = (f"{floor:,.0f}", f"{row['tokens_per_s'] / floor:.2f}") if floor else ("-", "-")
            engine_cells = ["-"] * 4 if system == "hf" else [
                f"{row['peak_kv_gib']:.1f}", f"{row['in_flight_mean']:.0f} / {row['in_flight_max']}",
                row["preemptions"], f"{row['warmup_s']:.1f}"]
            rows.append([system, f"{name} ({row['requests']} requests)", row["tokens"], f"{row['seconds']:.2f}",
                         f"{row['tokens_per_s']:,.0f}", floor_text, share, *engine_cells])
    print_markdown_table(["system", "workload", "tokens", "seconds", "tokens/s", "floor tokens/s", "of floor",
                          "peak KV GiB", "in flight mean / max", "preemptions", "warm-up s"], rows)
    for label in engines:
        if f"cold_start_s_{label}" in results:
            log(f"{label} cold start: {results[f'cold_start_s_{label}']:.1f} s")
        if f"ratio_{label}_over_hf_same_workload" in results:
            log(f"{label} / transformers on the same workload: "
                f"{results[f'ratio_{label}_over_hf_same_workload']:.1f} x")
    if "check" in results:
        log(f"check pass: {results['check']['pass']}")
    if errors:
        log(f"errors: {errors}")
    log(f"wall {report['wall_s']:.0f} s")
    if args.out:
        write_report(report, args.out, default=str)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
