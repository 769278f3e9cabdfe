"""The replay queue's data path: msgpack frames, the sharded queue's put/take, and the zarr trajectory log.

Groups are realistic in size, not in content: G trajectories (`--group-size`) of `--prompt-tokens` prompt tokens
and one response length each (`--response-lengths`), random token ids below the real 151,936-token vocabulary,
random logprobs, two policy versions per answer (a weight swap halfway) and rewards of +5 / -5 (so the queue's
zero-variance filter keeps every group). For each response length, `--groups` groups go through:

  encode  -- `wire.encode_group`: one msgpack frame per group (what a rollout worker sends);
  decode  -- `wire.decode_group` of every frame (what a queue shard does on receipt);
  put     -- `ShardedReplayQueue.put` of every frame into `--shards` in-process shards (routing and decode);
  take    -- `ShardedReplayQueue.take` of `--groups-per-step` groups at a time until the queue is empty;
  append  -- `TrajectoryLog.append` of `--groups-per-step` groups at a time (the log of consumed trajectories,
             zarr on disk in `--work-dir` or a temporary folder);
  read    -- `read_trajectory_log` of the whole log.

Figures: frames (groups) per second, MB/s and tokens (prompt + output) per second, the median of `--repeats`
runs. MB counts the frames' bytes for encode, decode, put and take, and the token arrays' bytes (prompt and output
tokens, logprobs, versions: 4 bytes each) for append and read. Each stage checks its count (frames decoded =
frames encoded, groups taken = frames put, trajectories read = trajectories appended, tokens read = tokens
written). Across processes the queue's shards are Ray actors (areal_async/run/ray_cluster.py); the project has
no Ray-free cross-process queue, so only the in-process queue is timed here.

Prints a table and writes JSON (default `results/bench_replay_queue.json`, run from the repository root).

    PYTHONPATH=$PWD python benchmarks/bench_replay_queue.py
    PYTHONPATH=$PWD python benchmarks/bench_replay_queue.py --response-lengths 8192 --groups 64 --repeats 5
    PYTHONPATH=$PWD python benchmarks/bench_replay_queue.py --quick    # seconds: 4 groups of 256 and 1024 tokens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np
import zarr

from areal_async.actor_system.replay_queue import ShardedReplayQueue
from areal_async.actor_system.trajectory_log import TrajectoryLog, read_trajectory_log
from areal_async.types import Trajectory
from areal_async.actor_system.wire import decode_group, encode_group
from harness import fill_unset, machine, print_markdown_table, script_parser, timed, write_report

VOCAB_SIZE = 151936  # DeepSeek-R1-Distill-Qwen-1.5B's
BYTES_PER_OUTPUT_TOKEN = 12  # token id, behaviour logprob, version: 4 bytes each
BYTES_PER_PROMPT_TOKEN = 4
STAGES = ("encode", "decode", "put", "take", "append", "read")
MB = 1e6


# ------------------------------------------------------------------------------------------------- groups


def make_group(index: int, group_size: int, prompt_tokens: int, response_tokens: int,
               rng: np.random.Generator) -> list[Trajectory]:
    """Group `index`: `group_size` answers of `response_tokens` tokens to one prompt of `prompt_tokens` tokens."""
    prompt = rng.integers(0, VOCAB_SIZE, prompt_tokens, dtype=np.int32)
    swap = response_tokens // 2  # the policy version changes halfway through every answer
    versions = np.concatenate([np.full(swap, index, np.int32), np.full(response_tokens - swap, index + 1, np.int32)])
    return [
        Trajectory(
            query_id=f"q{index}", group_id=f"g{index}", sample_index=sample, prompt_tokens=prompt,
            output_tokens=rng.integers(0, VOCAB_SIZE, response_tokens, dtype=np.int32),
            behaviour_logprobs=-rng.exponential(1.0, response_tokens).astype(np.float32),
            versions=versions, reward=5.0 if sample % 2 else -5.0, finish_reason="length",
            timings={"generate_s": 1.0, "reward_s": 0.01},
        )
        for sample in range(group_size)
    ]


def group_tokens(group: Sequence[Trajectory]) -> int:
    return sum(t.num_tokens for t in group)


def group_array_bytes(group: Sequence[Trajectory]) -> int:
    """Bytes of the group's token arrays: what the trajectory log stores per group, strings aside."""
    return sum(BYTES_PER_PROMPT_TOKEN * len(t.prompt_tokens) + BYTES_PER_OUTPUT_TOKEN * len(t.output_tokens)
               for t in group)


def batches(items: Sequence, size: int) -> list[Sequence]:
    """`items` cut into consecutive slices of `size` (the last may be shorter)."""
    return [items[start:start + size] for start in range(0, len(items), size)]


# ------------------------------------------------------------------------------------------------- stages


def check(condition: bool, what: str) -> None:
    """A stage that lost or changed data is a broken benchmark, not a slow one."""
    if not condition:
        raise RuntimeError(f"replay-queue benchmark: {what}")


def run_wire(groups: list) -> dict:
    """Seconds of encoding every group and of decoding every frame; the frames."""
    frames, encode_s = timed(lambda: [encode_group(group) for group in groups])
    decoded, decode_s = timed(lambda: [decode_group(frame) for frame in frames])
    check(len(decoded) == len(frames), f"{len(decoded)} frames decoded of {len(frames)} encoded")
    check(np.array_equal(decoded[-1][-1].output_tokens, groups[-1][-1].output_tokens),
          "a decoded frame's output tokens differ from the encoded ones")
    return {"encode": encode_s, "decode": decode_s, "frames": frames, "frames_decoded": len(decoded)}


def run_queue(frames: list[bytes], group_ids: list[str], shards: int, groups_per_step: int) -> dict:
    """Seconds of putting every frame into a fresh in-process queue and of taking them all out again."""
    queue = ShardedReplayQueue(shards, capacity_per_shard=len(frames), max_staleness=None)
    outcomes, put_s = timed(lambda: [queue.put(gid, frame) for gid, frame in zip(group_ids, frames)])
    check(outcomes.count("queued") == len(frames), f"queue outcomes {sorted(set(outcomes))}, expected 'queued'")

    def take_all() -> int:
        taken = 0
        for step in range(len(frames)):
            groups, _ = queue.take(groups_per_step, training_step=step)
            if not groups:
                return taken
            taken += len(groups)
        return taken

    taken, take_s = timed(take_all)
    check(taken == len(frames), f"{taken} groups taken of {len(frames)} put")
    return {"put": put_s, "take": take_s, "groups_taken": taken}


def run_log(groups: list, groups_per_step: int, directory: Path) -> dict:
    """Seconds of appending the groups to a fresh trajectory log, a step's groups at a time, and of reading it."""
    log = TrajectoryLog(directory)
    steps = batches(groups, groups_per_step)
    _, append_s = timed(lambda: [log.append([t for g in step for t in g], consumed_at_step=i)
                                 for i, step in enumerate(steps)])
    log.close()
    rows, read_s = timed(lambda: list(read_trajectory_log(directory)))
    written = sum(len(t.output_tokens) for g in groups for t in g)
    check(len(rows) == sum(len(g) for g in groups), f"{len(rows)} trajectories read of {log.num_trajectories}")
    check(sum(len(r["output_tokens"]) for r in rows) == written, "the log read back other output tokens")
    return {"append": append_s, "read": read_s, "trajectories_read": len(rows)}


def rates(seconds: float, frames: int, nbytes: int, tokens: int) -> dict:
    return {"seconds": seconds, "frames_per_s": frames / seconds, "mb_per_s": nbytes / seconds / MB,
            "tokens_per_s": tokens / seconds}


def bench_length(response_tokens: int, args, work: Path) -> dict:
    """Every stage for groups of one response length, the median of `args.repeats` runs."""
    rng = np.random.default_rng(response_tokens)
    groups = [make_group(i, args.group_size, args.prompt_tokens, response_tokens, rng) for i in range(args.groups)]
    group_ids = [group[0].group_id for group in groups]
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(args.repeats):
        wire = run_wire(groups)
        queue = run_queue(wire["frames"], group_ids, args.shards, args.groups_per_step)
        log = run_log(groups, args.groups_per_step, Path(tempfile.mkdtemp(prefix=f"log-{response_tokens}-", dir=work)))
        for stage in STAGES:
            seconds[stage].append({**wire, **queue, **log}[stage])
    frames = wire["frames"]
    frame_bytes = sum(len(frame) for frame in frames)
    array_bytes = sum(group_array_bytes(g) for g in groups)
    tokens = sum(group_tokens(g) for g in groups)
    row = {
        "response_tokens": response_tokens, "group_size": args.group_size, "prompt_tokens": args.prompt_tokens,
        "frames_encoded": len(frames), "frames_decoded": wire["frames_decoded"], "frames_put": len(frames),
        "groups_taken": queue["groups_taken"], "trajectories_appended": sum(len(g) for g in groups),
        "trajectories_read": log["trajectories_read"], "frame_bytes_mean": frame_bytes / len(frames),
        "tokens": tokens, "seconds_all_repeats": seconds,
    }
    for stage in STAGES:
        nbytes = array_bytes if stage in ("append", "read") else frame_bytes
        row[stage] = rates(statistics.median(seconds[stage]), len(frames), nbytes, tokens)
    return row


# ------------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    print_markdown_table(
        ["response tokens", "frame MB", "stage", "frames/s", "MB/s", "Mtokens/s"],
        [[row["response_tokens"], f"{row['frame_bytes_mean'] / MB:.3f}", stage, f"{row[stage]['frames_per_s']:,.1f}",
          f"{row[stage]['mb_per_s']:,.1f}", f"{row[stage]['tokens_per_s'] / 1e6:,.2f}"]
         for row in rows for stage in STAGES])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def defaults(quick: bool) -> dict:
    """Values of the options left unset: a measurement, or seconds of the same code paths (`--quick`)."""
    if quick:
        return {"response_lengths": [256, 1024], "groups": 4, "groups_per_step": 2, "repeats": 1}
    return {"response_lengths": [256, 1024, 4096, 8192], "groups": 32, "groups_per_step": 8, "repeats": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--response-lengths", nargs="+", type=positive_int,
                        help="output tokens per answer, one measurement each; default: 256 1024 4096 8192")
    parser.add_argument("--group-size", type=positive_int, default=8,
                        help="answers per group (one frame); default: %(default)s")
    parser.add_argument("--prompt-tokens", type=positive_int, default=256, help="default: %(default)s")
    parser.add_argument("--groups", type=positive_int, help="groups per measurement; default: 32")
    parser.add_argument("--shards", type=positive_int, default=4, help="queue shards; default: %(default)s")
    parser.add_argument("--groups-per-step", type=positive_int,
                        help="groups per take and per log append (one training step's); default: 8")
    parser.add_argument("--repeats", type=positive_int, help="runs per measurement (their median); default: 3")
    parser.add_argument("--work-dir", default=None, help="folder of the zarr logs; default: a temporary folder")
    parser.add_argument("--quick", action="store_true",
                        help="seconds, for tests: options left unset become 4 groups of 256 and 1024 tokens, "
                             "2 groups per step, 1 repeat")
    parser.add_argument("--out", default="results/bench_replay_queue.json", help="JSON file; default: %(default)s")
    args = parser.parse_args(argv)
    fill_unset(args, defaults(args.quick))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"args": vars(args), **machine(),
              "versions": {"msgpack": ".".join(map(str, msgpack.version)), "zarr": zarr.__version__,
                           "numpy": np.__version__}, "results": []}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work_dir or temporary)
        for response_tokens in args.response_lengths:
            row = bench_length(response_tokens, args, work)
            report["results"].append(row)
            print(f"[{response_tokens} tokens] encode {row['encode']['mb_per_s']:,.0f} MB/s, decode "
                  f"{row['decode']['mb_per_s']:,.0f} MB/s, put {row['put']['frames_per_s']:,.0f} frames/s, "
                  f"append {row['append']['mb_per_s']:,.0f} MB/s", flush=True)
    write_report(report, args.out)
    print_table(report["results"])
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
