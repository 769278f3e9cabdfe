"""The simulator's inputs (areal_async/planning/simulate.py): rates read from the benchmarks' JSON reports, and a run's
config turned into a SystemModel.

Every reader takes the parsed report and the path it came from, and fails with a ValueError naming the file and
the key it needed when the report lacks it (an explicit rate passed instead avoids the report).

- Generation (benchmarks/bench_generation.py): the decode step's cost is fitted from the report's per-step
  replay times (`results.step_ms_<system>`, keys `graph_b<batch>_kv<positions>`: milliseconds of one step of
  <batch> slots reading <positions> cache positions), a line in the positions. What a prefill token costs is the
  rest of the `<system>_fixed` workload's time. How much of the step's fixed part scales with the batch is found
  by replaying the `<system>_longtail` workload (whose tail runs on ever smaller batches) through the engine
  model until it matches the measured tokens/s.
- Training (benchmarks/bench_training.py): tokens/s of one result row (system, workload, step kind), scaled by the
  forward passes a step of the config does against the row's (activation checkpointing, a KL reference, the
  proximal recompute).
- Weight publication (benchmarks/bench_weight_sync.py): the GB/s of a row of the chosen transport, applied to the
  model's bytes; without a report, a bandwidth.
- Scoring (benchmarks/bench_verifier.py): seconds per response of one verifier process.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from areal_async.config import Objective, Placement, TrainConfig
from areal_async.planning.memory_plan import GIB, element_size, engine_sequences, parameter_count, pool_blocks
from areal_async.model.paged_cache import kv_block_bytes
from areal_async.model.decoder import DecoderConfig
from areal_async.planning.placement import inline_gpu_plan
from areal_async.planning.simulate import DecodeCost, EngineModel, LengthModel, Request, SystemModel, call_seconds

STEP_KEY = re.compile(r"graph_b(\d+)_kv(\d+)")
# the benchmark's long-tailed workload: log-normal limits (sigma 1) of mean new_tokens / 4 in [16, new_tokens]
LONGTAIL_MEAN_SHARE, LONGTAIL_LOW = 0.25, 16
LONGTAIL_SEED = 3
FIT_ITERATIONS = 40
SHAPE_TOLERANCE = 0.05  # a report measured on a model this much larger or smaller is another model


def load_report(path: str | Path) -> dict:
    """A benchmark's JSON report; a ValueError names a missing or unreadable file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such benchmark report") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON report ({error})") from None


def report_value(report: dict, path: str | Path, *keys: str):
    """report[keys[0]][keys[1]]...; a ValueError names the file and the dotted key when one is missing."""
    value = report
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            have = sorted(value) if isinstance(value, dict) else []
            raise ValueError(f"{path}: no key {'.'.join(keys[: depth + 1])} (it has: {', '.join(map(str, have))})")
        value = value[key]
    return value


# ---------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class DecodeFit:
    """A DecodeCost fitted from a generation report, with the engine it was measured on and how well the model
    replays the report's workloads (tokens/s, measured against modelled)."""

    cost: DecodeCost
    engine: EngineModel
    batch_share: float  # of the step's fixed part at the measured batch, the share that scales with the batch
    replay: dict[str, dict[str, float]]


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x for [(x, y)]."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


def longtail_requests(count: int, prompt: int, new_tokens: int, seed: int = LONGTAIL_SEED) -> list[Request]:
    """Requests like bench_generation's longtail workload (our own draws of its distribution)."""
    lengths = LengthModel(mean=new_tokens * LONGTAIL_MEAN_SHARE, cap=new_tokens, low=LONGTAIL_LOW)
    rng = random.Random(seed)
    return [Request(prompt, length, length) for length in (lengths.draw(rng) for _ in range(count))]


def _rate(requests: list[Request], engine: EngineModel, cost: DecodeCost) -> float:
    return sum(r.length for r in requests) / call_seconds(requests, engine, cost)


def fit_decode_cost(report: dict, path: str | Path, system: str, batch_share: float | None = None) -> DecodeFit:
    """The decode cost of `system` in a bench_generation report (see the module's docstring). `batch_share`
    given: that share of the fixed part scales with the batch, and the longtail workload is not needed. `replay`
    holds the workloads' tokens/s, measured and modelled: fixed is matched by construction (the rest of its time
    is the prefill's), longtail too when the share is fitted; fixed_hf is a check."""
    table = report_value(report, path, "results", f"step_ms_{system}")
    batch = int(report_value(report, path, "args", "batch"))
    points = [(float(m.group(2)), ms) for key, ms in table.items()
              if (m := STEP_KEY.fullmatch(key)) and int(m.group(1)) == batch]
    if len(points) < 2:
        raise ValueError(f"{path}: results.step_ms_{system} has {len(points)} graph_b{batch}_kv* step times; "
                         "the fit needs two KV lengths at least")
    intercept_ms, slope_ms = line_fit(points)
    per_kv_s = slope_ms / batch / 1e3
    lookahead = 1 if str(report.get("device", "cuda")).startswith("cuda") else 0
    engine = EngineModel(slots=batch, sync_every=int(report_value(report, path, "args", "sync_every")),
                         lookahead=lookahead)
    prompt, new_tokens = (int(report_value(report, path, "args", key)) for key in ("prompt_len", "new_tokens"))

    def cost(share: float, prefill_token_s: float) -> DecodeCost:
        return DecodeCost(fixed_s=intercept_ms * (1 - share) / 1e3, per_slot_s=intercept_ms * share / batch / 1e3,
                          per_kv_s=per_kv_s, prefill_token_s=prefill_token_s)

    fixed_count = int(report_value(report, path, "results", f"{system}_fixed", "requests"))
    fixed_requests = [Request(prompt, new_tokens, new_tokens)] * fixed_count
    decoding = call_seconds(fixed_requests, engine, cost(0.0, 0.0))  # a full batch: the share does not matter
    measured_s = float(report_value(report, path, "results", f"{system}_fixed", "seconds"))
    prefill_token_s = max(0.0, measured_s - decoding) / (len(fixed_requests) * prompt)

    results = report["results"]
    workloads = {"fixed": fixed_requests}
    if batch_share is None or f"{system}_longtail" in results:
        count = int(report_value(report, path, "results", f"{system}_longtail", "requests"))
        workloads["longtail"] = longtail_requests(count, prompt, new_tokens)
    if batch_share is None:
        target = float(report_value(report, path, "results", f"{system}_longtail", "tokens_per_s"))
        low, high = 0.0, 1.0  # the modelled rate grows with the share: smaller batches get cheaper
        for _ in range(FIT_ITERATIONS):
            middle = (low + high) / 2
            if _rate(workloads["longtail"], engine, cost(middle, prefill_token_s)) < target:
                low = middle
            else:
                high = middle
        batch_share = (low + high) / 2
    elif not 0 <= batch_share <= 1:
        raise ValueError(f"the batch share of a decode step's fixed part must be in [0, 1], got {batch_share}")
    fitted = cost(batch_share, prefill_token_s)
    if f"{system}_fixed_hf" in results:
        hf_new_tokens = int(report_value(report, path, "args", "hf_new_tokens"))
        count = int(results[f"{system}_fixed_hf"]["requests"])
        workloads["fixed_hf"] = [Request(prompt, hf_new_tokens, hf_new_tokens)] * count
    replay = {name: {"measured": float(results[f"{system}_{name}"]["tokens_per_s"]),
                     "model": _rate(requests, engine, fitted)} for name, requests in workloads.items()}
    return DecodeFit(fitted, engine, batch_share, replay)


def check_generation_shape(report: dict, path: str | Path, shape: DecoderConfig) -> None:
    """Fails when the report's model is not `shape`: bench_generation's floor records the bytes of the weights a
    decode step reads (all but the embedding table, bf16)."""
    floor = next((value for key, value in report.get("results", {}).items() if key.startswith("floor_")), None)
    if floor is None or "weights_gb_per_step" not in floor:
        return
    ours = (parameter_count(shape) - shape.vocab_size * shape.hidden_size) * 2 / 1e9
    if abs(floor["weights_gb_per_step"] / ours - 1) > SHAPE_TOLERANCE:
        raise ValueError(f"{path} measured a model whose decode step reads {floor['weights_gb_per_step']:.2f} GB of "
                         f"weights, the config's reads {ours:.2f} GB: pass --gen-tokens-per-s for this model")


def decode_cost_from_rate(tokens_per_s: float, prefill_token_s: float = 0.0) -> DecodeCost:
    """A decode cost of `tokens_per_s` per engine whatever the batch (every slot-step costs the same), for an
    explicit rate instead of a report."""
    if tokens_per_s <= 0:
        raise ValueError(f"the generation rate must be > 0 tokens/s, got {tokens_per_s}")
    return DecodeCost(fixed_s=0.0, per_slot_s=1 / tokens_per_s, per_kv_s=0.0, prefill_token_s=prefill_token_s)


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainRate:
    """Trained tokens/s of one learner rank for the config, from a bench_training row (`measured`, its
    `parameters`) scaled by `factor`."""

    tokens_per_s: float
    measured: float
    factor: float
    parameters: int | None


def forward_passes(proximal: bool, checkpointing: bool, reference: bool) -> int:
    """Forward-pass equivalents per token of a training step: forward + backward (3), the proximal recompute
    (1), activation checkpointing's second forward (1), the KL reference's forward (1)."""
    return 3 + int(proximal) + int(checkpointing) + int(reference)


def training_rate(report: dict, path: str | Path, config: TrainConfig, system: str = "ours", workload: str = "b",
                  step_kind: str = "ppo_step") -> TrainRate:
    """Tokens/s per learner rank for `config` from a bench_training report's row (system, workload, step_kind);
    the benchmark's step has no checkpointing and no reference model."""
    rows = report_value(report, path, "results")
    row = next((r for r in rows if (r.get("system"), r.get("workload"), r.get("step_kind"))
                == (system, workload, step_kind)), None)
    if row is None:
        have = sorted({(r.get("system"), r.get("workload"), r.get("step_kind")) for r in rows})
        raise ValueError(f"{path}: no results row with system={system}, workload={workload}, step_kind={step_kind} "
                         f"(rows: {have})")
    measured = float(row["tokens_per_s"])
    benchmark = forward_passes(step_kind == "ppo_step", checkpointing=False, reference=False)
    ours = forward_passes(config.ppo.objective is Objective.decoupled, config.ppo.activation_checkpointing,
                          config.ppo.kl_coef > 0)
    factor = benchmark / ours
    return TrainRate(measured * factor, measured, factor, report.get("parameters"))


# ---------------------------------------------------------------------------------------------- publication, scoring


def weight_sync_seconds(model_bytes: int, report: dict | None = None, path: str | Path = "", transport: str = "nccl",
                        gb_per_s: float | None = None) -> float:
    """Seconds of one publish round for `model_bytes`: at the GB/s of `report`'s fastest row of `transport`
    (bench_weight_sync), else at `gb_per_s`."""
    if report is not None:
        rows = [r for r in report_value(report, path, "results") if r.get("path") == transport]
        if not rows:
            have = sorted({r.get("path") for r in report["results"]})
            raise ValueError(f"{path}: no results row with path={transport} (paths: {have})")
        gb_per_s = max(float(r["gb_per_s"]) for r in rows)
    if gb_per_s is None or gb_per_s <= 0:
        raise ValueError(f"weight publication needs a bench_weight_sync report or a bandwidth > 0 GB/s, got {gb_per_s}")
    return model_bytes / (gb_per_s * 1e9)


def reward_seconds(report: dict, path: str | Path) -> float:
    """Seconds one verifier process spends per response (bench_verifier: responses/s over its workers)."""
    rate = float(report_value(report, path, "throughput", "responses_per_s"))
    workers = int(report_value(report, path, "args", "workers"))
    return workers / rate


# ---------------------------------------------------------------------------------------------- the config


def config_system(config: TrainConfig, shape: DecoderConfig, decode: DecodeCost, train_tokens_per_s: float, *,
                  prompt_tokens: int, lengths: LengthModel, weight_sync_s: float, reward_s: float,
                  **extra) -> SystemModel:
    """The SystemModel of a run of `config` (placement, batch, staleness, engine settings) with the given rates;
    `extra` sets SystemModel's other fields (host_s, take_s, filtered_fraction, learner_start_s).

    A Ray run has its workers and learner ranks. An inline run (cluster.placement=inline) is one engine and one
    learner on `device`, taking turns: one worker and one learner rank, whose generation and training never
    overlap at max_staleness 0 (at a larger bound the model overlaps them, the inline loop does not). On a GPU
    its engine holds what the trainer plans: the KV budget that the learner leaves of cluster.gpu_memory_gib."""
    cluster, rollout, engine = config.cluster, config.rollout, config.engine
    inline = cluster.placement is Placement.inline
    longest = prompt_tokens + config.generation.max_new_tokens
    cuda = torch.device(config.device if inline else cluster.rollout_device).type == "cuda"
    budget = None if engine.kv_memory_gib is None else int(engine.kv_memory_gib * 2**30)
    if inline and cuda and budget is None:
        budget = inline_gpu_plan(config, shape, int(cluster.gpu_memory_gib * GIB), prompt_tokens).kv_cache
    dtype = getattr(torch, config.model.dtype)
    blocks = pool_blocks(budget, kv_block_bytes(shape, engine.kv_block_size, dtype), engine.max_slots, longest,
                         engine.kv_block_size)
    slots = engine_sequences(blocks, engine.max_slots, engine.kv_block_size, prompt_tokens,
                             config.generation.max_new_tokens, engine.expected_length_fraction)
    if slots < 1:
        raise ValueError(f"engine.kv_memory_gib={engine.kv_memory_gib} holds no sequence of {longest} tokens")
    return SystemModel(
        rollout_workers=1 if inline else cluster.num_rollout_workers,
        learner_ranks=1 if inline else cluster.num_learner_ranks,
        groups_per_step=rollout.groups_per_step,
        group_size=config.generation.group_size,
        groups_per_request=rollout.groups_per_request,
        max_staleness=rollout.max_staleness,
        prompt_tokens=prompt_tokens,
        lengths=lengths,
        engine=EngineModel(slots=slots, sync_every=engine.sync_every, lookahead=int(cuda)),
        decode=decode,
        train_tokens_per_s=train_tokens_per_s,
        weight_sync_s=weight_sync_s,
        reward_s=reward_s,
        queue_capacity=rollout.num_queue_shards * rollout.queue_capacity_per_shard,
        **extra,
    )


def model_bytes(config: TrainConfig, shape: DecoderConfig) -> int:
    """Bytes of one published version: every parameter in model.dtype."""
    return parameter_count(shape) * element_size(getattr(torch, config.model.dtype))


def steps_for(epochs: float, prompts: int, groups_per_step: int) -> int:
    """Training steps for `epochs` passes over `prompts` prompts."""
    return math.ceil(epochs * prompts / groups_per_step)
