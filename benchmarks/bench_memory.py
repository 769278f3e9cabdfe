"""GPU memory of the one-GPU run's parts by phase, what the memory plan (areal_async/planning/memory_plan.py) is fitted to.

Shape: DeepSeek-R1-Distill-Qwen-1.5B (random weights, untied LM head). In one process, on one CUDA device:
  1. the learner (fp32 master weights, bf16 autocast, compiled layers, 4 minibatches) takes PPO steps on 64
     long-tailed sequences (mean 2,304 tokens, one of 8,448) at micro-batches of 16,384, 8,192 and 16,384 tokens:
     memory allocated after each step and its peak (the plan's activation estimate beside it);
  2. the gradients dropped and the cache emptied (what generation keeps of the learner);
  3. two weight publications in process (the publisher's buffers and the cast);
  4. AdamW's moments copied to pinned host memory and back (the optimizer-offload question of issue 25);
  5. the engine's buffers and decode graphs reserved for 256 slots at 8,448 tokens with a 16 GiB KV pool, then
     released, three times (the cost of rebuilding them for every generation phase).
Prints each record and writes JSON (`--out`, default results/bench_memory.json). Needs a CUDA device.

    PYTHONPATH=$PWD python3 benchmarks/bench_memory.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from actors.engine import TorchEngine
from areal_async.config import PPOConfig
from areal_async.planning.memory_plan import GIB, activation_bytes, head_gradient_bytes, parameter_count
from areal_async.model import CausalLM
from areal_async.model.shapes import R1_DISTILL_QWEN_1_5B
from areal_async.objective import trajectory_advantages
from areal_async.types import SamplingParams
from areal_async.weight_sync import InProcessTransport, WeightPublisher
from harness import long_tailed_lengths, random_model, script_parser, synthetic_trajectories, write_report
from learners.fsdp_learner import FSDPLearner

LONGEST = 8448


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--out", default="results/bench_memory.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_memory.py measures GPU memory: it needs a CUDA device", file=sys.stderr)
        return 2
    report: dict = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__}
    out = Path(args.out)

    def record(name: str, **extra) -> None:
        torch.cuda.synchronize()
        report[name] = dict(alloc=torch.cuda.memory_allocated() / GIB, reserved=torch.cuda.memory_reserved() / GIB,
                            peak=torch.cuda.max_memory_allocated() / GIB, **extra)
        print(name, report[name], flush=True)
        write_report(report, out, indent=1)

    model = random_model(R1_DISTILL_QWEN_1_5B, "cuda")
    shape = model.config
    record("model_fp32", params=parameter_count(shape))
    learner = FSDPLearner(model, PPOConfig(micro_batch_tokens=16384, minibatches_per_step=4), pad_token_id=0,
                          temperature=1.0, device="cuda", compile_layers=True, compute_dtype=torch.bfloat16,
                          publish_dtype=torch.bfloat16)
    lengths = long_tailed_lengths(150_000, 2304, LONGEST, seed=3)[:63] + [LONGEST]
    trajectories = synthetic_trajectories(lengths, shape.vocab_size)
    advantages = trajectory_advantages(trajectories, "batch")
    for index, micro_batch in enumerate((16384, 8192, 16384)):
        learner.ppo.config.micro_batch_tokens = micro_batch
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        learner.train_step(trajectories, advantages)
        torch.cuda.synchronize()
        planned = activation_bytes(shape, max(micro_batch, LONGEST), 2, False, 6 * GIB) + head_gradient_bytes(shape)
        record(f"step{index}_micro_batch{micro_batch}", seconds=time.perf_counter() - started, tokens=sum(lengths),
               plan_activations_and_head_gradient=planned / GIB)
    learner.optimizer.zero_grad(set_to_none=True)  # train_step drops them too; this leaves no doubt
    torch.cuda.empty_cache()
    record("gradients_dropped")
    torch.cuda.reset_peak_memory_stats()
    publisher = WeightPublisher(learner.policy_state(), InProcessTransport())
    for version in (1, 2):
        publisher.publish(learner.policy_state(), version)
        record(f"published_v{version}")

    moments = [t for state in learner.optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.is_cuda and t.numel() > 1]
    started = time.perf_counter()
    host = [torch.empty(m.shape, dtype=m.dtype, pin_memory=True) for m in moments]
    pinned = time.perf_counter()
    for copy, moment in zip(host, moments):
        copy.copy_(moment, non_blocking=True)
    torch.cuda.synchronize()
    to_host = time.perf_counter()
    for copy, moment in zip(host, moments):
        moment.copy_(copy, non_blocking=True)
    torch.cuda.synchronize()
    report["optimizer_offload"] = dict(gib=sum(m.numel() * m.element_size() for m in moments) / GIB,
                                       pin_s=pinned - started, to_host_s=to_host - pinned,
                                       to_device_s=time.perf_counter() - to_host)
    print("optimizer_offload", report["optimizer_offload"], flush=True)
    del host

    engine = TorchEngine(CausalLM(shape).to("cuda", torch.bfloat16), pad_token_id=0, device="cuda", max_slots=256,
                         kv_memory_gib=16)
    params = SamplingParams(temperature=0.6, max_new_tokens=LONGEST - 256)
    for index in range(3):
        started = time.perf_counter()
        engine.reserve(LONGEST, LONGEST - 256, params)
        torch.cuda.synchronize()
        record(f"engine_reserved{index}", seconds=time.perf_counter() - started, graphs=len(engine.graphs),
               pool_address=engine._state.cache.keys.data_ptr())
        started = time.perf_counter()
        engine.release()
        torch.cuda.empty_cache()
        record(f"engine_released{index}", seconds=time.perf_counter() - started)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
