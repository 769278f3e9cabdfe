"""Training throughput of the learner on one GPU, against transformers references in the same run.

Shape: DeepSeek-R1-Distill-Qwen-1.5B (random weights). Workloads:
  (a) 4 sequences x 4096 tokens;
  (b) packed sequences with a long-tailed length distribution (mean ~2K, max 8K tokens).
Systems:
  ours        -- the project's learner path with its defaults: on one GPU the module itself (fp32 parameters
                 and gradients, bf16 compute under autocast; no FSDP), compiled decoder layers, packed sequences
                 (cuDNN attention for packs of few, long document lengths, varlen flash otherwise), the chunked
                 LM head keeping its bf16 logits for backward, the decoupled PPO loss, fused AdamW with the
                 clipping factor folded in;
  hf_ckpt     -- transformers Qwen2ForCausalLM (SDPA, bf16 weights, fused AdamW) with gradient checkpointing;
  hf_compile  -- the same model under torch.compile, without checkpointing.
Ablations of `ours` (each undoes one choice, update step only, on --ablation-workloads):
  ours_fa2            -- packed attention through the varlen flash kernel for every pack (no cuDNN);
  ours_flex           -- packed attention through flex_attention + document BlockMask;
  ours_fsdp1          -- FSDP2 on the one-rank mesh, as before (bf16 gathered copies of fp32 shards);
  ours_fsdp_reshard   -- that, with the older one-rank FSDP settings too: layers resharded after forward (all-
                         gathered again for backward) and a forced divide factor (an extra pass over the gradients);
  ours_recompute_head -- the LM head forms its logits again in backward instead of keeping them;
  ours_plain_head     -- the LM head as plain autograd over 1024-row chunks (every chunk's fp32 logits kept);
  ours_clip_pass      -- gradient clipping as a pass of its own over the gradients, not inside AdamW;
  ours_prev           -- all of the previous defaults at once (flash, one-rank FSDP, recomputing head, clipping
                         pass, host syncs): the `ours` of the 2026-11-25 runs;
  ours_syncs          -- the step's host reads of before: the attention layout read back from the device's
                         document ids, `if mask.any()` in the loss between forward and backward, one-rank
                         collectives of the stats, the stats read before the optimizer step (learner.defer_reads off).
Variants of `ours` (candidate fixes, update step only, on --ablation-workloads):
  ours_devpacks       -- the packs on the device before the step (as the references' batches are), so the step
                         copies nothing from the host;
  ours_late_zero      -- the gradients dropped right after the optimizer step is queued (as the references do),
                         not at the start of the next step;
  ours_expandable     -- the caching allocator's expandable segments switched on for this system (at run time;
                         `--alloc-conf expandable_segments:True` sets it for the whole run before CUDA starts).
MFU counts 6 x parameters (embeddings included) per token plus causal attention, against 989 TFLOP/s
(H100 SXM bf16 dense). Prints a table and writes JSON. `--tiny` runs a tiny shape (on the CPU when there is
no GPU): a smoke test of the script, not a measurement.

    PYTHONPATH=$PWD python benchmarks/bench_training.py    # JSON: results/bench_training.json
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import gzip
import os
import gc
import importlib.util
import json
import math
import socket
import time
import traceback
from pathlib import Path

import torch

from harness import (cuda_ms, empty_cache, long_tailed_lengths, print_columns, random_model, script_parser,
                     synchronize, synthetic_trajectories, write_report)

PEAK_FLOPS = 989e12
SHAPE = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
)
# Token counts of the workloads and the per-pass budget; --tiny swaps in TINY_*.
SIZES = dict(seq=4096, total=32768, mean=2048, max_len=8192, budget=16384)
TINY_SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
)
TINY_SIZES = dict(seq=128, total=1024, mean=64, max_len=256, budget=512)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ABLATIONS = ("ours_fa2", "ours_flex", "ours_fsdp1", "ours_fsdp_reshard", "ours_recompute_head", "ours_plain_head",
             "ours_clip_pass", "ours_prev", "ours_syncs", "ours_devpacks", "ours_late_zero", "ours_expandable")
# CUDA caching-allocator counters reported per timed step (a retry frees cached blocks: a device-wide sync).
ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


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


def allocator_counters() -> dict[str, int]:
    if DEVICE != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(name, 0)) for name in ALLOCATOR_COUNTERS}


def time_steps(step, warmup: int, steps: int, counters: dict | None = None) -> float:
    """Median seconds per step (device-synchronised wall clock). `counters` receives the allocator counters'
    increase per timed step."""
    for _ in range(warmup):
        step()
    synchronize(DEVICE)
    before = allocator_counters()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        synchronize(DEVICE)
        times.append(time.perf_counter() - started)
    if counters is not None:
        after = allocator_counters()
        counters.update({name: (after[name] - before[name]) / steps for name in before})
    return sorted(times)[len(times) // 2]


def free_parameters(*modules_or_optimizers) -> None:
    """Gives the memory of a finished system back at once (its parameters, gradients and optimizer state),
    whatever still refers to the objects (compiled code, hooks)."""
    for thing in modules_or_optimizers:
        if isinstance(thing, torch.optim.Optimizer):
            thing.state.clear()
            continue
        for param in thing.parameters():
            param.grad = None
            local = param.to_local() if hasattr(param, "to_local") else param
            local.untyped_storage().resize_(0)


def hf_system(compiled: bool, checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPE, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=DEVICE == "cuda" or None)
    forward = torch.compile(model) if compiled else model

    def make_step(sequences: list[torch.Tensor]):
        batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0).to(DEVICE)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True).to(DEVICE)
        labels = batch.masked_fill(mask == 0, -100)

        def step():
            loss = forward(input_ids=batch, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return make_step, lambda: free_parameters(model, optimizer)


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


# The learner settings `ours` runs with: one LearnerConfig, which the selfcheck's fallbacks change (recorded in
# the JSON); the ablations derive theirs from it.
@functools.cache
def base_learner_config():
    from areal_async.config import LearnerConfig

    return LearnerConfig()


def settings(learner_config) -> dict:
    """A learner config for the JSON, flat (enums as their values)."""
    def plain(value):
        return value.value if isinstance(value, enum.Enum) else value

    config = dataclasses.asdict(learner_config)
    attention = {f"packed_attention.{k}": plain(v) for k, v in config.pop("packed_attention").items()}
    return attention | {k: plain(v) for k, v in config.items()}


def variant_learner_config(system: str):
    """The learner config of an ablation system: `ours`'s with the settings that system undoes."""
    from areal_async.config import OneRankMode, PackedAttentionKernel

    config = copy.deepcopy(base_learner_config())
    if system in ("ours_syncs", "ours_prev"):
        config.defer_reads = False
    if system in ("ours_recompute_head", "ours_prev"):
        config.keep_logits_gib = 0.0
    if system in ("ours_fa2", "ours_prev"):
        config.packed_attention.kernel = PackedAttentionKernel.flash
    if system == "ours_flex":
        config.packed_attention.kernel = PackedAttentionKernel.flex
    if system in ("ours_fsdp1", "ours_fsdp_reshard", "ours_prev"):
        config.one_rank_mode = OneRankMode.fsdp
    if system in ("ours_clip_pass", "ours_prev"):
        config.fused_clip = False
    return config


@contextlib.contextmanager
def ours_variant(system: str):
    """For the duration of the block, the code an ablation system swaps in where its choice is not a setting
    (the syncs of before, the plain-autograd LM head, the older one-rank FSDP sharding, expandable segments)."""
    from areal_async.model import logprobs
    from learners import fsdp_learner, ppo_learner

    saved = (logprobs.token_logprobs, fsdp_learner.fully_shard, fsdp_learner.shard_policy,
             ppo_learner.decoupled_ppo_loss, ppo_learner.packed_sequence_logprobs)
    expandable = False
    try:
        if system in ("ours_syncs", "ours_prev"):
            original_loss, original_logprobs = ppo_learner.decoupled_ppo_loss, ppo_learner.packed_sequence_logprobs

            def synced_loss(*args, **kwargs):  # the `if mask.any()` of before, between forward and backward
                bool(args[4].bool().any())
                return original_loss(*args, **kwargs)

            def layout_read_back(model, batch, *args, **kwargs):  # no host-side lengths: document ids read back
                return original_logprobs(model, dataclasses.replace(batch, document_lengths=None), *args, **kwargs)

            ppo_learner.decoupled_ppo_loss = synced_loss
            ppo_learner.packed_sequence_logprobs = layout_read_back
        if system == "ours_expandable" and DEVICE == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
            expandable = True
        if system == "ours_plain_head":
            logprobs.token_logprobs = plain_autograd_token_logprobs
        if system == "ours_fsdp_reshard":
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
        (logprobs.token_logprobs, fsdp_learner.fully_shard, fsdp_learner.shard_policy,
         ppo_learner.decoupled_ppo_loss, ppo_learner.packed_sequence_logprobs) = saved
        if expandable:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")


def init_process_group() -> None:
    """A one-rank process group (NCCL on the GPU, gloo on the CPU) for the learner."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def ours_system(compile_layers: bool, activation_checkpointing: bool, decoupled: bool, system: str = "ours"):
    """The learner on one device (a one-rank group). decoupled=False builds the update's packs without the
    proximal-logprob forward (behaviour logprobs stand in; the update costs the same), which spares the
    ablations the compilation of the no-grad forward."""
    from areal_async.config import Objective, PPOConfig
    from learners import fsdp_learner

    init_process_group()
    model = random_model(SHAPE, DEVICE, tie_word_embeddings=False)
    # one optimizer update a step: ppo_step is the references' step (recompute + one update), as measured before
    config = PPOConfig(lr=1e-6, micro_batch_tokens=SIZES["budget"], activation_checkpointing=activation_checkpointing,
                       objective=Objective.decoupled if decoupled else Objective.naive, minibatches_per_step=1)
    learner = fsdp_learner.FSDPLearner(model, config, pad_token_id=0, temperature=1.0, device=DEVICE,
                                       compile_layers=compile_layers, learner_config=variant_learner_config(system))

    def make_steps(sequences: list[torch.Tensor]):
        from areal_async.objective import trajectory_advantages

        trajectories = synthetic_trajectories([len(s) for s in sequences], SHAPE["vocab_size"])
        advantages = trajectory_advantages(trajectories, "group")
        prepared = {}

        def update():  # forward + backward + optimizer step on prepared packs (what the references do)
            if "packs" not in prepared:
                prepared["packs"] = learner.prepare(trajectories, advantages)
                if system == "ours_devpacks":  # on the device beforehand, as the references' batches
                    prepared["packs"] = [pack.to(DEVICE) for pack in prepared["packs"]]
            learner.update(prepared["packs"])  # zero_grad, backward, optimizer_step; stats read once at the end
            if system == "ours_late_zero":  # the gradients go while the optimizer step runs, not next step
                learner.optimizer.zero_grad(set_to_none=True)

        def full_step():  # the whole PPO step, proximal logprob recomputation included
            learner.train_step(trajectories, advantages)

        update.learner = full_step.learner = learner  # for the profile's phase labels

        return {"update": update, "ppo_step": full_step}

    return make_steps, lambda: free_parameters(learner.model, learner.optimizer)


def workload_sequences(name: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if name == "a":
        lengths = [SIZES["seq"]] * 4
    else:
        lengths = long_tailed_lengths(SIZES["total"], SIZES["mean"], SIZES["max_len"], seed=2)
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


def pack_kernels(lengths: list[int], system: str) -> list[str]:
    """The attention kernel each of our packs of these sequences gets on CUDA (bf16) under `system`'s settings."""
    from areal_async.model import attention as model_attention
    from areal_async.packing import split_into_packs

    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    attention = variant_learner_config(system).packed_attention
    return [model_attention.cuda_packed_kernel([lengths[i] for i in pack], torch.bfloat16, head_dim, attention)
            for pack in split_into_packs(lengths, SIZES["budget"])]


KERNEL_CATEGORIES = {"attention": ("flash", "flex", "attn", "fmha", "sdpa"), "optimizer": ("adam",),
                     "gemm": ("gemm", "cutlass", "nvjet", "xmma", "sm90", "cublas"),
                     "copy_nccl": ("memcpy", "nccl", "memset", "copy"), "triton_fused": ("triton",)}
# What the device executes, in a chrome trace (user annotations, "gpu_user_annotation", are not: their GPU
# ranges only span kernels that are counted already).
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
STEP_LABEL = "bench.step"


@contextlib.contextmanager
def phase_labels(learner) -> None:
    """record_function labels around the parts of our learner's step, for the gap report: the decoder body,
    the LM head, the loss, the clipping + optimizer step (instance and module attributes, restored after)."""
    from torch.profiler import record_function

    from areal_async.model import logprobs
    from learners import ppo_learner

    def labelled(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    saved = (logprobs.token_logprobs, ppo_learner.decoupled_ppo_loss)
    model = learner.model
    had_hidden, had_opt = "hidden_states" in vars(model), "optimizer_step" in vars(learner)
    old_hidden, old_opt = model.hidden_states, learner.optimizer_step
    try:
        logprobs.token_logprobs = labelled("phase:lm_head", saved[0])
        ppo_learner.decoupled_ppo_loss = labelled("phase:loss", saved[1])
        model.hidden_states = labelled("phase:forward", old_hidden)
        learner.optimizer_step = labelled("phase:clip_optimizer", old_opt)
        yield
    finally:
        logprobs.token_logprobs, ppo_learner.decoupled_ppo_loss = saved
        if had_hidden:
            model.hidden_states = old_hidden
        else:
            del model.hidden_states
        if had_opt:
            learner.optimizer_step = old_opt
        else:
            del learner.optimizer_step


def kernel_category(name: str) -> str:
    key = name.lower()
    return next((n for n, patterns in KERNEL_CATEGORIES.items() if any(p in key for p in patterns)), "other")


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for begin, end in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(a, b) for a, b in merged]


def analyse_trace(events: list[dict], unprofiled_ms: float | None = None, top_gaps: int = 15) -> dict:
    """Kernel time, GPU idle time and the largest idle gaps of one profiled step, from chrome-trace events
    (ts/dur in microseconds). The step is the STEP_LABEL annotation's span (its thread is the main thread);
    device work is the DEVICE_CATEGORIES events inside it. Each gap is attributed to the phase of the kernel
    that ends it (the phase that launched it late): the phase:* label around its launch on the main thread, or
    "backward" / "lm_head_backward" on the autograd thread; "step_start" before the first kernel, "step_end"
    after the last. Each gap lists the innermost host events running during it, per thread."""
    steps = [e for e in events if e.get("ph") == "X" and e.get("name") == STEP_LABEL
             and e.get("cat") in ("user_annotation", "cpu_op")]
    if not steps:
        raise ValueError(f"no {STEP_LABEL!r} annotation in the trace")
    step = max(steps, key=lambda e: e["dur"])
    t0, t1, main_tid = float(step["ts"]), float(step["ts"]) + float(step["dur"]), step["tid"]
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
              and t0 <= float(e["ts"]) <= t1]
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in HOST_CATEGORIES and e is not step]
    launches = {e["args"]["correlation"]: e for e in host
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernel_us = sum(float(e["dur"]) for e in device)
    categories: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in device:
        category = kernel_category(e["name"]) if e["cat"] == "kernel" else "copy_nccl"
        categories[category] = categories.get(category, 0.0) + float(e["dur"]) / 1e3
        entry = by_name.setdefault(e["name"], [0.0, 0])
        entry[0] += float(e["dur"]) / 1e3
        entry[1] += 1
    busy = merge_intervals([(max(t0, float(e["ts"])), min(t1, float(e["ts"]) + float(e["dur"]))) for e in device])
    busy_us = sum(b - a for a, b in busy)
    # Phase labels and the LM head's backward, per thread, as intervals.
    labels = [e for e in host if e["name"].startswith("phase:") or "ChunkedTokenLogprobsBackward" in e["name"]]

    def phase_of(kernel: dict | None) -> str:
        if kernel is None:
            return "step_end"
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "unknown"
        ts = float(launch["ts"])
        inside = [e for e in labels if e["tid"] == launch["tid"] and float(e["ts"]) <= ts <= float(e["ts"]) + float(e["dur"])]
        if any("ChunkedTokenLogprobsBackward" in e["name"] for e in inside):
            return "lm_head_backward"
        names = [e["name"][len("phase:"):] for e in sorted(inside, key=lambda e: -float(e["dur"]))
                 if e["name"].startswith("phase:")]
        if names:
            return names[-1]  # the innermost label
        return "other_main" if launch["tid"] == main_tid else "backward"

    starts = sorted(device, key=lambda e: float(e["ts"]))
    gaps, cursor, index = [], t0, 0
    for begin, end in busy + [(t1, t1)]:
        if begin - cursor > 0:
            while index < len(starts) and float(starts[index]["ts"]) < begin - 1e-3:
                index += 1
            following = starts[index] if index < len(starts) and begin < t1 else None
            phase = "step_start" if cursor == t0 and busy and begin == busy[0][0] else phase_of(following)
            gaps.append({"begin": cursor, "end": begin, "phase": phase,
                         "next_kernel": following["name"][:120] if following else None})
        cursor = max(cursor, end)
    idle_by_phase: dict[str, float] = {}
    for gap in gaps:
        idle_by_phase[gap["phase"]] = idle_by_phase.get(gap["phase"], 0.0) + (gap["end"] - gap["begin"]) / 1e3
    largest = sorted(gaps, key=lambda g: g["begin"] - g["end"])[:top_gaps]
    threads = {main_tid: "main"}
    for gap in largest:  # host events by their own time within the gap (less that of events nested in them)
        overlapping = [e for e in host if float(e["ts"]) < gap["end"] and float(e["ts"]) + float(e["dur"]) > gap["begin"]]
        clipped = {id(e): (max(float(e["ts"]), gap["begin"]), min(float(e["ts"]) + float(e["dur"]), gap["end"]))
                   for e in overlapping}
        ranked = []
        for e in overlapping:
            e0, e1 = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            nested = [clipped[id(f)] for f in overlapping if f is not e and f["tid"] == e["tid"]
                      and e0 <= float(f["ts"]) and float(f["ts"]) + float(f["dur"]) <= e1 and float(f["dur"]) < e1 - e0]
            own = (clipped[id(e)][1] - clipped[id(e)][0]) - sum(b - a for a, b in merge_intervals(nested))
            thread = threads.setdefault(e["tid"], f"thread{len(threads)}")
            ranked.append((own, clipped[id(e)][1] - clipped[id(e)][0], f"{thread}: {e['name'][:90]}"))
        ranked.sort(reverse=True)
        gap["cpu_ops"] = [f"{name} (own {own / 1e3:.2f} of {total / 1e3:.2f} ms)" for own, total, name in ranked[:6]
                          if own > 0]
    window_ms = (t1 - t0) / 1e3
    result = {
        "wall_ms_profiled": window_ms, "kernel_ms": kernel_us / 1e3, "busy_ms": busy_us / 1e3,
        "gpu_idle_ms": window_ms - busy_us / 1e3,
        **{f"{k}_ms": v for k, v in sorted(categories.items())},
        "idle_by_phase_ms": dict(sorted(idle_by_phase.items(), key=lambda kv: -kv[1])),
        "gap_count": len(gaps),
        "gaps": [{"start_ms": (g["begin"] - t0) / 1e3, "length_ms": (g["end"] - g["begin"]) / 1e3,
                  "phase": g["phase"], "next_kernel": g["next_kernel"], "cpu_ops": g["cpu_ops"]} for g in largest],
        "top_kernels": [{"ms": ms, "count": count, "name": name[:150]}
                        for name, (ms, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]],
    }
    if unprofiled_ms is not None:  # the profiler slows the host, not the kernels: idle of the timed steps
        result["step_ms_unprofiled"] = unprofiled_ms
        result["gpu_idle_ms_unprofiled_est"] = unprofiled_ms - busy_us / 1e3
    return result


def format_trace_summary(label: str, summary: dict) -> str:
    lines = [f"{label}: profiled step {summary['wall_ms_profiled']:.1f} ms, kernels {summary['kernel_ms']:.1f} ms, "
             f"busy (union) {summary['busy_ms']:.1f} ms, GPU idle {summary['gpu_idle_ms']:.1f} ms profiled"
             + (f", ~{summary['gpu_idle_ms_unprofiled_est']:.1f} ms in the unprofiled "
                f"{summary['step_ms_unprofiled']:.1f} ms step" if "step_ms_unprofiled" in summary else ""),
             "  ".join(f"{k} {v:.1f}" for k, v in summary.items() if k.endswith("_ms") and k not in
                       ("wall_ms_profiled", "kernel_ms", "busy_ms", "gpu_idle_ms", "step_ms_unprofiled")
                       and isinstance(v, float)),
             "idle by phase (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in summary["idle_by_phase_ms"].items())
             + f"  ({summary['gap_count']} gaps)",
             f"{len(summary['gaps'])} largest GPU idle gaps (start in the step, length, phase, next kernel; host ops):"]
    for gap in summary["gaps"]:
        lines.append(f"  @{gap['start_ms']:8.2f} ms  {gap['length_ms']:6.2f} ms  {gap['phase']:<17} "
                     f"-> {(gap['next_kernel'] or '-')[:60]}")
        lines += [f"        {op}" for op in gap["cpu_ops"]]
    lines.append("top kernels:")
    lines += [f"{k['ms']:9.2f} ms {k['count']:6d}x  {k['name']}" for k in summary["top_kernels"]]
    return "\n".join(lines)


def profile_step(step, label: str, out_dir: Path, unprofiled_s: float | None = None, learner=None,
                 save_trace: bool = False) -> dict:
    """One profiled step (CPU + CUDA activities, record_function labels, no stacks): kernel time (device events
    only, annotations excluded), GPU idle time (the step's span less the union of kernel intervals) and the
    largest idle gaps with the host ops running during them, from the chrome trace. Writes
    profile_<label>.txt (and, with save_trace, the gzipped trace if under 20 MB)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    step()
    synchronize(DEVICE)
    labels = phase_labels(learner) if learner is not None else contextlib.nullcontext()
    with labels, profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=False) as prof:
        with record_function(STEP_LABEL):
            step()
            synchronize(DEVICE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        raw = path.read_bytes()
    trace = json.loads(raw)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    summary = analyse_trace(events, unprofiled_s * 1e3 if unprofiled_s else None)
    if save_trace:
        packed = gzip.compress(raw, compresslevel=6)
        if len(packed) < 20 * 2**20:
            (out_dir / f"trace_{label}.json.gz").write_bytes(packed)
            summary["trace_file"] = f"trace_{label}.json.gz"
        summary["trace_gz_mib"] = len(packed) / 2**20
    text = format_trace_summary(label, summary)
    (out_dir / f"profile_{label}.txt").write_text(text + "\n")
    print(text, flush=True)
    return summary


def relative_diffs(got: list[torch.Tensor], expected: list[torch.Tensor], names=("out", "dq", "dk", "dv")) -> dict:
    return {name: ((a.float() - b.float()).norm() / b.float().norm()).item() for name, a, b in zip(names, got, expected)}


def check_lm_head(checks: dict) -> None:
    """The LM head: the chunked Function keeping its bf16 logits, and recomputing them, against plain autograd
    (bf16 weights, a pack's 16,384 rows): results, time and extra peak memory of forward + backward."""
    from areal_async.model import logprobs

    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, hidden_size, vocab = SIZES["budget"], SHAPE["hidden_size"], SHAPE["vocab_size"]
    hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16, generator=generator)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    grad = torch.randn(rows, device="cuda", generator=generator)
    results = {}
    kept = functools.partial(logprobs.token_logprobs, keep_logits_gib=base_learner_config().keep_logits_gib or 6.0)
    for name, head in (("kept", kept), ("recompute", logprobs.token_logprobs),
                       ("plain", plain_autograd_token_logprobs)):
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
    po, ph, pw = results["plain"][:3]
    checks["lm_head"] = {"rows": rows} | {
        name: {"logprob_max_abs_diff_vs_plain": (o - po).abs().max().item(),
               "grad_hidden_rel_diff_vs_plain": ((h - ph).norm() / ph.norm()).item(),
               "grad_weight_rel_diff_vs_plain": ((w - pw).norm() / pw.norm()).item(),
               "fwd_bwd_ms": ms, "extra_peak_gib": gib}
        for name, (o, h, w, ms, gib) in results.items()
    }


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask over packed rows: a query sees earlier keys of its own document only.

    document_ids: [B, T] int -> [B, 1, T, T] bool (O(T^2) memory). Every query sees itself, so no row is empty.
    """
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_document)[:, None]


def check_attention(checks: dict) -> None:
    """Packed attention kernels against SDPA in fp32 with the dense document mask (mixed lengths), cuDNN against
    varlen flash on the (a) pack in bf16, and each one's time per layer there (forward + backward). Falls back
    to repeated key/value heads if cuDNN rejects grouped-query shapes, and to flash (the learner config's
    packed_attention.kernel) if cuDNN fails or disagrees; to flex if flash does."""
    from areal_async.config import PackedAttentionKernel
    from areal_async.model import attention as model_attention

    settings = base_learner_config().packed_attention

    generator = torch.Generator(device="cuda").manual_seed(1)
    heads, kv_heads = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    dim = SHAPE["hidden_size"] // heads

    def random_inputs(tokens):
        leaves = [torch.randn(tokens, h, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
                  for h in (heads, kv_heads, kv_heads)]
        return leaves, torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)

    def run(attention, layout, leaves, grad):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = attention(*inputs, layout)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in inputs]

    flash = model_attention.packed_flash_attention
    by_length = model_attention.attention_by_length
    lengths = [1000, 1537, 463, 96, 1000]
    document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda()
    leaves, grad = random_inputs(sum(lengths))
    ref_leaves = [t.float().requires_grad_() for t in leaves]
    mask = document_causal_mask(document_ids)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in ref_leaves), attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    ref.backward(grad.float())
    reference = [ref.detach()] + [t.grad for t in ref_leaves]
    del ref, ref_leaves, mask
    checks["attention"] = attention = {"mixed_lengths": lengths}
    try:
        attention["flash_rel_diff_vs_fp32"] = relative_diffs(
            run(flash, model_attention.document_spans(document_ids), leaves, grad), reference)
        if max(attention["flash_rel_diff_vs_fp32"].values()) > 0.05:
            raise RuntimeError("varlen flash attention disagrees with the fp32 reference")
    except Exception:  # noqa: BLE001
        attention["flash_error"] = traceback.format_exc()[-1500:]
        settings.kernel = PackedAttentionKernel.flex
        checks["fallback"] = "packed_attention.kernel=flex"
        return
    cudnn_error = None
    for repeat_kv in (settings.cudnn_repeat_kv, True):
        settings.cudnn_repeat_kv = repeat_kv
        try:
            got = run(by_length, model_attention.document_length_groups(document_ids, kernel="cudnn", repeat_kv=repeat_kv),
                      leaves, grad)
            attention["cudnn_rel_diff_vs_fp32"] = relative_diffs(got, reference)
            attention["cudnn_repeat_kv"] = repeat_kv
            if max(attention["cudnn_rel_diff_vs_fp32"].values()) > 0.05:
                raise RuntimeError("cuDNN attention disagrees with the fp32 reference")
            cudnn_error = None
            break
        except Exception:  # noqa: BLE001
            cudnn_error = traceback.format_exc()[-1500:]
            attention.setdefault("cudnn_errors", []).append(cudnn_error)
    del leaves, grad, reference
    # The (a) pack: 4 documents of SIZES["seq"] tokens.
    document_ids = torch.arange(4).repeat_interleave(SIZES["seq"])[None].cuda()
    leaves, grad = random_inputs(4 * SIZES["seq"])
    spans = model_attention.document_spans(document_ids)
    flash_out = run(flash, spans, leaves, grad)
    attention["pack_a_flash_fwd_bwd_ms"] = cuda_ms(lambda: run(flash, spans, leaves, grad))
    attention["pack_a_flash_fwd_ms"] = cuda_ms(lambda: flash(*leaves, spans))
    if cudnn_error is None:
        try:
            groups = model_attention.document_length_groups(document_ids, kernel="cudnn", repeat_kv=settings.cudnn_repeat_kv)
            attention["pack_a_cudnn_rel_diff_vs_flash_bf16"] = relative_diffs(
                run(by_length, groups, leaves, grad), flash_out)
            attention["pack_a_cudnn_fwd_bwd_ms"] = cuda_ms(lambda: run(by_length, groups, leaves, grad))
            attention["pack_a_cudnn_fwd_ms"] = cuda_ms(lambda: by_length(*leaves, groups))
            if max(attention["pack_a_cudnn_rel_diff_vs_flash_bf16"].values()) > 0.05:
                raise RuntimeError("cuDNN attention disagrees with varlen flash on the (a) pack")
        except Exception:  # noqa: BLE001
            cudnn_error = traceback.format_exc()[-1500:]
            attention.setdefault("cudnn_errors", []).append(cudnn_error)
    if cudnn_error is not None and settings.kernel in (PackedAttentionKernel.auto, PackedAttentionKernel.cudnn):
        settings.kernel = PackedAttentionKernel.flash
        checks["fallback"] = "packed_attention.kernel=flash (cuDNN failed)"


def check_one_rank_learner(checks: dict) -> None:
    """The unwrapped one-rank learner (fp32 parameters, bf16 autocast) against the FSDP-wrapped one (bf16
    gathered copies of fp32 shards) on a 2-layer model of the benchmark's widths: one update from the same
    weights on the same 2 x 1024-token batch (loss, gradient before clipping, the update)."""
    from areal_async.config import OneRankMode, PPOConfig
    from learners import fsdp_learner
    from areal_async.objective import trajectory_advantages

    init_process_group()
    model = random_model({**SHAPE, "num_hidden_layers": 2}, DEVICE, tie_word_embeddings=False)
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trajectories = synthetic_trajectories([SIZES["seq"] // 4] * 2, SHAPE["vocab_size"])
    advantages = trajectory_advantages(trajectories, "group")
    config = PPOConfig(lr=1e-5, micro_batch_tokens=SIZES["budget"], grad_clip=1.0)
    outcomes = {}
    for mode in OneRankMode:
        learner_config = dataclasses.replace(base_learner_config(), one_rank_mode=mode)
        learner = fsdp_learner.FSDPLearner(copy.deepcopy(model), config, pad_token_id=0, temperature=1.0,
                                           device=DEVICE, learner_config=learner_config)
        packs = learner.prepare(trajectories, advantages)
        learner.optimizer.zero_grad(set_to_none=True)
        stats = learner.backward(packs)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().clone()
                 for n, p in learner.model.named_parameters()}
        norm = learner.optimizer_step()
        updates = {n: w.float() - initial[n] for n, w in learner.full_state_dict().items()}
        outcomes[mode] = (stats["loss"], norm, grads, updates)
        free_parameters(learner.model, learner.optimizer)
        del learner, packs
    (pl, pn, pg, pu), (fl, fn, fg, fu) = outcomes[OneRankMode.plain], outcomes[OneRankMode.fsdp]

    def global_rel(a, b):
        return math.sqrt(sum((a[n] - b[n]).square().sum().item() for n in b) / sum(b[n].square().sum().item()
                                                                                    for n in b))

    checks["one_rank_plain_vs_fsdp"] = {
        "loss": [pl, fl], "grad_norm": [pn, fn], "grad_rel_diff": global_rel(pg, fg),
        "update_rel_diff": global_rel(pu, fu),
        "worst_param_grad_rel_diff": max(((pg[n] - fg[n]).norm() / fg[n].norm()).item() for n in fg),
    }
    del model, outcomes


def probe_kernels(checks: dict) -> None:
    """What the device's torch offers beyond FA2 (reported only)."""
    probe = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    try:
        from torch.nn import attention as nn_attention

        probe["flash_attention_impls"] = list(nn_attention.list_flash_attention_impls()) \
            if hasattr(nn_attention, "list_flash_attention_impls") else "no registry in this torch"
    except Exception as error:  # noqa: BLE001
        probe["flash_attention_impls"] = repr(error)
    for module in ("flash_attn_interface", "flash_attn", "flash_attn.cute"):
        try:
            probe[module] = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            probe[module] = False
    checks["kernels"] = probe


def selfcheck(report: dict) -> None:
    """Checks the CUDA paths against references on random data before timing anything (with fallbacks), and
    the unwrapped one-rank learner against the FSDP-wrapped one."""
    checks = report.setdefault("selfcheck", {})
    parts = [check_one_rank_learner]
    if DEVICE == "cuda":
        parts = [probe_kernels, check_attention, check_lm_head] + parts
    for part in parts:
        try:
            part(checks)
        except Exception:  # noqa: BLE001
            checks[part.__name__] = {"error": traceback.format_exc()[-1500:]}
        gc.collect()
        empty_cache(DEVICE)
    print("selfcheck:", json.dumps(checks, indent=1), flush=True)


def measure(system: str, workload: str, args) -> list[dict]:
    sequences = workload_sequences(workload)
    lengths = [len(s) for s in sequences]
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.ExitStack() as stack:
        if system.startswith("hf"):
            make_step, release = hf_system(compiled=system == "hf_compile", checkpointing=system == "hf_ckpt")
            steps = [make_step(batch) for batch in hf_padded_microbatches(sequences, SIZES["budget"])]
            timed = {"lm_step": lambda: [s() for s in steps]}
            extra = {}
        else:
            stack.enter_context(ours_variant(system))  # the variant holds while the steps run
            ablation = system in ABLATIONS
            kinds = ["update"] if ablation else args.step_kinds
            make_steps, release = ours_system(compile_layers=not args.no_compile,
                                              activation_checkpointing=system == "ours_ckpt",
                                              decoupled="ppo_step" in kinds, system=system)
            timed = {kind: step for kind, step in make_steps(sequences).items() if kind in kinds}
            extra = {"settings": settings(variant_learner_config(system)), "pack_kernels": pack_kernels(lengths, system)}
        try:
            return [row | extra for row in timed_results(system, workload, lengths, timed, args)]
        finally:
            release()


def timed_results(system: str, workload: str, lengths: list[int], timed: dict, args) -> list[dict]:
    """Median step time of each of `timed`'s steps, as result rows (and a profile of (a)'s update step)."""
    results = []
    for kind, step in timed.items():
        counters: dict = {}
        seconds = time_steps(step, args.warmup, args.steps, counters)
        tokens = sum(lengths)
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
        results.append({
            "system": system, "workload": workload, "step_kind": kind, "sequences": len(lengths),
            "tokens": tokens, "max_len": max(lengths), "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "mfu": step_flops(lengths) / seconds / PEAK_FLOPS,
            "peak_memory_gib": peak, "allocator_per_step": counters,
        })
        print(f"{system:>19} {workload} {kind:>8}: {tokens / seconds:9.0f} tokens/s  MFU {results[-1]['mfu']:.3f}  "
              f"peak {peak:.1f} GiB", flush=True)
        if args.profile and (DEVICE == "cuda" or args.tiny) and workload == "a" and kind in ("update", "lm_step") \
                and (not args.profile_systems or system in args.profile_systems):
            try:
                results[-1]["profile"] = profile_step(
                    step, f"{system}_{workload}_{kind}", Path(args.out).parent, unprofiled_s=seconds,
                    learner=getattr(step, "learner", None),
                    save_trace=args.save_traces or system in ("ours", "hf_compile"))
            except Exception:  # noqa: BLE001
                print("profiling failed:", traceback.format_exc()[-800:], flush=True)
    return results


def jobs(args) -> list[tuple[str, str]]:
    """(system, workload) pairs in the order they run: ours and hf_compile on (a) first (the comparison the
    target is about), then ours on the other workloads, then the ablations, then everything else."""
    pairs = []
    for system in args.systems:
        if system in ABLATIONS:
            workloads = args.ablation_workloads
        elif system.startswith("hf"):
            workloads = args.hf_workloads
        else:
            workloads = args.workloads
        pairs += [(system, w) for w in args.workloads if w in workloads]

    def priority(pair):
        system, workload = pair
        if system in ("ours", "hf_compile") and workload == "a":
            return 0
        if system == "ours":
            return 1
        return 2 if system in ABLATIONS else 3

    return sorted(pairs, key=priority)


def main() -> None:
    global DEVICE
    parser = script_parser(__doc__)
    parser.add_argument("--systems", nargs="+", default=["ours", "hf_ckpt", "hf_compile"])
    parser.add_argument("--workloads", nargs="+", default=["a", "b"])
    parser.add_argument("--hf-workloads", nargs="+", default=["a"],
                        help="workloads of the hf systems (hf_compile's compilation for (b) takes minutes)")
    parser.add_argument("--ablation-workloads", nargs="+", default=["a"])
    parser.add_argument("--step-kinds", nargs="+", default=["update", "ppo_step"], choices=["update", "ppo_step"],
                        help="what `ours` measures (the ablations measure the update only)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="results/bench_training.json")
    parser.add_argument("--profile", action="store_true",
                        help="profile one (a) step of each system: kernel time, GPU idle time, the largest idle gaps")
    parser.add_argument("--gaps", action="store_true", help="the gap report (implies --profile)")
    parser.add_argument("--profile-systems", nargs="*", default=None,
                        help="profile only these systems (default: all on (a))")
    parser.add_argument("--save-traces", action="store_true",
                        help="keep every profiled system's gzipped chrome trace (default: ours and hf_compile)")
    parser.add_argument("--alloc-conf", default=None,
                        help="PYTORCH_CUDA_ALLOC_CONF for the whole run (e.g. expandable_segments:True), set "
                             "before CUDA starts")
    parser.add_argument("--selfcheck", action="store_true", help="check the CUDA paths and the one-rank learner first")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="skip measurements that would start after this many seconds (0: no limit)")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and workloads: a smoke test of the script")
    parser.add_argument("--device", default=DEVICE, choices=["cuda", "cpu"])
    parser.add_argument("--no-compile", action="store_true", help="our decoder layers eager (default with --tiny)")
    parser.add_argument("--learner", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of `ours`'s learner config (areal_async.config.LearnerConfig), e.g. "
                             "packed_attention.kernel=flash keep_logits_gib=0")
    args = parser.parse_args()
    from areal_async.config import apply_overrides

    try:
        apply_overrides(base_learner_config(), args.learner)
    except ValueError as error:
        parser.error(str(error))
    DEVICE = args.device
    args.profile = args.profile or args.gaps
    if args.alloc_conf is not None:
        if DEVICE == "cuda" and torch.cuda.is_initialized():
            raise SystemExit("--alloc-conf: CUDA is already initialised")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
        if DEVICE == "cuda":  # in case the allocator's configuration was read at import already
            torch.cuda.memory._set_allocator_settings(args.alloc_conf)
    if args.tiny:
        SHAPE.update(TINY_SHAPE)
        SIZES.update(TINY_SIZES)
        args.no_compile = True
    started = time.perf_counter()
    try:  # the ablations rebuild the learner; keep its recompilations compiled
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except AttributeError:
        pass
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
              "shape": SHAPE, "sizes": SIZES, "parameters": parameter_count(), "peak_flops": PEAK_FLOPS,
              "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the profiles are written there before the first report
    if args.selfcheck:
        selfcheck(report)
        report["selfcheck_s"] = time.perf_counter() - started
        write_report(report, out)
    report["settings"] = settings(base_learner_config())  # after the selfcheck's fallbacks, if any
    for system, workload in jobs(args):
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            report["results"].append({"system": system, "workload": workload, "error": "skipped: time budget"})
            print(f"{system} {workload}: skipped (time budget)", flush=True)
            continue
        job_started = time.perf_counter()
        try:
            report["results"] += measure(system, workload, args)
        except torch.OutOfMemoryError as error:
            report["results"].append({"system": system, "workload": workload, "error": f"OOM: {error}"[:300]})
            print(f"{system} {workload}: out of memory", flush=True)
        except Exception:  # noqa: BLE001 -- one failing system must not lose the others' figures
            error = traceback.format_exc()[-2000:]
            report["results"].append({"system": system, "workload": workload, "error": error})
            print(f"{system} {workload}: failed\n{error}", flush=True)
            attention = base_learner_config().packed_attention
            if system == "ours" and attention.kernel.value in ("auto", "cudnn"):
                # The main figure must not be lost to the new attention path: once more with varlen flash.
                from areal_async.config import PackedAttentionKernel

                attention.kernel = PackedAttentionKernel.flash
                report["fallback"] = (f"ours {workload} failed with cuDNN attention allowed; "
                                      "packed_attention.kernel=flash")
                print(report["fallback"], flush=True)
                try:
                    report["results"] += measure(system, workload, args)
                except Exception:  # noqa: BLE001
                    report["results"].append({"system": system, "workload": workload,
                                              "error": traceback.format_exc()[-2000:]})
        report["results"][-1]["job_s"] = time.perf_counter() - job_started
        report["elapsed_s"] = time.perf_counter() - started
        write_report(report, out)  # after every measurement: a timeout keeps the rest
        gc.collect()
        empty_cache(DEVICE)
    print_columns([("system", 19), ("load", 4), ("step", 8), ("tokens/s", 9), ("MFU", 6), ("peak GiB", 8)],
                  [[r["system"], r["workload"], r["step_kind"], f"{r['tokens_per_s']:.0f}", f"{r['mfu']:.3f}",
                    f"{r['peak_memory_gib']:.1f}"] for r in report["results"] if "error" not in r])
    print(f"written to {out} after {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
