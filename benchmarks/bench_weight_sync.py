"""Weight publication: seconds per published version against model size and the transport's bandwidth.

The project's own publication code does the work: a `WeightPublisher` stages each version (bit buckets, the XOR
delta over the previous version, checksums) and hands it to a transport; `WeightReceiver`s fetch it, check every
bucket's checksum and write it into their parameters. Weights are random, in the shapes of real models (names
and shapes from `CausalLM` on the meta device), in the published dtype (`--dtype`). Version 0 goes out as a
snapshot; every later version as a delta after flipping the lowest bit of every weight, so that every bucket
changes, as after an optimizer step. The run ends by comparing every receiver's `state_checksum` with the
publisher's.

Paths:
  inprocess -- `InProcessTransport`, publisher and one receiver in this process (the inline trainer's path), on
               `--device`;
  gloo      -- `TorchDistributedTransport` over a gloo group opened as the Ray run opens its weight-sync groups
               (`host_store` here, `open_sync_group` in each member): the publisher and 1..N receivers
               (`--receivers`) are spawned processes on this machine, CPU tensors;
  nccl      -- the same with NCCL, one GPU per member (publisher cuda:0, receiver i cuda:i): needs
               receivers + 1 GPUs.

Figures per path, model and receiver count:
  snapshot s        -- version 0: a full snapshot to every receiver;
  delta s/version   -- median over the delta versions of the publisher's round: stage (copy into buckets, XOR,
                       checksums of the changed buckets) + transfer (every receiver fetched, checked and applied
                       it and acknowledged); `stage s` and `transfer s` split it;
  MB/version        -- bytes each receiver got for one version (the parameters' bytes in the published dtype);
  GB/s              -- MB/version over delta s/version; `aggregate GB/s` multiplies by the receivers;
  raw GB/s          -- the transport alone: a bucket-sized copy (inprocess) or broadcast over the same group
                       (gloo, nccl), the floor a version could reach;
  checksum s        -- one pass of `bits_checksum` over a version's buckets on the receiver's device, measured
                       apart from the rounds (each round spends it twice: publisher and receiver);
  identical         -- every receiver ended with the publisher's bits.

Prints a table and writes JSON (default `results/bench_weight_sync.json`, run from the repository root).

    PYTHONPATH=$PWD python benchmarks/bench_weight_sync.py --models tiny smollm-135m --receivers 1 2 --threads 1
    PYTHONPATH=$PWD python benchmarks/bench_weight_sync.py --device cuda --paths inprocess nccl \\
        --models r1-distill-1.5b --receivers 1 3
    PYTHONPATH=$PWD python benchmarks/bench_weight_sync.py --quick    # seconds: the tiny model, gloo 1 receiver
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from areal_async.actor_system.process_groups import host_store, open_sync_group
from areal_async.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    InProcessTransport,
    WeightPublisher,
    WeightReceiver,
    bits_checksum,
    bits_of,
    gather_bucket,
    param_specs,
    plan_buckets,
    state_checksum,
)
from harness import (best_seconds, fill_unset, keep_going, machine, print_markdown_table, script_parser, synchronize,
                     write_report)

# --models name -> its shape's name in areal_async.model.shapes
MODELS = {"tiny": "TINY_BENCHMARK", "smollm-135m": "SMOLLM_135M", "qwen2.5-0.5b": "QWEN2_5_0_5B",
          "r1-distill-1.5b": "R1_DISTILL_QWEN_1_5B"}
PATHS = ("inprocess", "gloo", "nccl")
STORE_HOST = "127.0.0.1"
RAW_REPEATS = 3
GB = 1e9


# ------------------------------------------------------------------------------------------------ weights


def parameter_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of `model`'s decoder, in the model's order (tied weights once)."""
    # Imported here, not at the top: spawned members re-import this module, and the model package brings
    # torch._dynamo (seconds per process); they get the shapes from the parent instead.
    from areal_async.model import CausalLM, DecoderConfig, shapes as model_shapes

    with torch.device("meta"):
        decoder = CausalLM(DecoderConfig(**getattr(model_shapes, MODELS[model])))
    return [(name, tuple(p.shape)) for name, p in decoder.named_parameters()]


def random_state(shapes: list, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights drawn from N(0, 0.02²), as a fresh model's, in `dtype` on `device`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return {name: torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
            for name, shape in shapes}


def zero_state(shapes: list, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes}


def next_version(state: dict[str, torch.Tensor]) -> None:
    """Flips the lowest bit of every weight in place: every bucket changes, as after an optimizer step."""
    for tensor in state.values():
        bits_of(tensor).bitwise_xor_(1)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ measurements


def checksum_seconds(state: dict[str, torch.Tensor], bucket_bytes: int) -> float:
    """Seconds of one `bits_checksum` pass over every bucket of `state`'s layout (what a receiver checks per
    version), the buckets gathered beforehand."""
    layout = plan_buckets(param_specs(state), bucket_bytes)
    device = next(iter(state.values())).device
    seconds = 0.0
    for bucket in layout.buckets:
        words = torch.empty(bucket.numel, dtype=bucket.bits_dtype, device=device)
        gather_bucket(bucket, state, words)
        synchronize(device)
        started = time.perf_counter()
        bits_checksum(words).item()
        seconds += time.perf_counter() - started
    return seconds


def raw_buffer_bytes(model_bytes: int, bucket_bytes: int) -> int:
    """The size of the raw-bandwidth probe: one bucket, or the whole model when it is smaller."""
    return max(1, min(model_bytes, bucket_bytes))


def copy_gb_per_s(nbytes: int, device: torch.device) -> float:
    """Best of RAW_REPEATS copies of an `nbytes` buffer on `device` (the in-process transport's floor)."""
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return nbytes / best_seconds(lambda: target.copy_(source), device, RAW_REPEATS) / GB


def broadcast_gb_per_s(group: dist.ProcessGroup, nbytes: int, device: torch.device) -> float:
    """Best of RAW_REPEATS broadcasts of `nbytes` from rank 0 over `group` (every member calls this; rank 0's
    figure counts): the transport's floor."""
    buffer = torch.ones(nbytes, dtype=torch.uint8, device=device)
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return nbytes / best_seconds(lambda: group.broadcast([buffer], options).wait(), device, RAW_REPEATS) / GB


def summarize(setup: dict, rounds: list[dict], raw_gb_per_s: float, check_seconds: float, identical: bool) -> dict:
    """One result row. `setup`: path, model, parameters, dtype, device, receivers and model_bytes; `rounds`
    [versions]: seconds, stage_seconds, transfer_seconds, bytes_per_receiver and publisher_bytes_sent of each
    version, the first the snapshot."""
    snapshot, deltas = rounds[0], rounds[1:]
    seconds = statistics.median(r["seconds"] for r in deltas)
    per_receiver = statistics.median(r["bytes_per_receiver"] for r in deltas)
    model_bytes, receivers = setup["model_bytes"], setup["receivers"]
    return {
        **setup,
        "snapshot_seconds": snapshot["seconds"], "snapshot_bytes_per_receiver": snapshot["bytes_per_receiver"],
        "delta_versions": len(deltas),
        "seconds_per_version": seconds,
        "stage_seconds": statistics.median(r["stage_seconds"] for r in deltas),
        "transfer_seconds": statistics.median(r["transfer_seconds"] for r in deltas),
        "bytes_per_version": per_receiver,
        "publisher_bytes_sent_per_version": statistics.median(r["publisher_bytes_sent"] for r in deltas),
        "gb_per_s": per_receiver / seconds / GB,
        "aggregate_gb_per_s": receivers * per_receiver / seconds / GB,
        "raw_gb_per_s": raw_gb_per_s,
        "floor_seconds_per_version": model_bytes / (raw_gb_per_s * GB),
        "checksum_seconds": check_seconds,
        "checksum_gb_per_s": model_bytes / check_seconds / GB,
        "weights_identical": identical,
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------------------------- in process


def bench_inprocess(model: str, args, dtype: torch.dtype, device: torch.device) -> dict:
    """Publisher and one receiver in this process, through InProcessTransport."""
    shapes = parameter_shapes(model)
    state = random_state(shapes, dtype, device)
    transport = InProcessTransport()
    publisher = WeightPublisher(state, transport, args.bucket_bytes)
    receiver = WeightReceiver(zero_state(shapes, dtype, device), transport)
    rounds = []
    for version in range(args.versions + 1):
        if version:
            next_version(state)
        synchronize(device)
        started = time.perf_counter()
        record = publisher.publish(state, version)
        staged = time.perf_counter()
        receiver.sync()
        synchronize(device)
        finished = time.perf_counter()
        received = receiver.stats()  # InProcessTransport copies at fetch: the receiver counts the bytes
        rounds.append({"version": version, "seconds": finished - started, "stage_seconds": record["stage_seconds"],
                       "transfer_seconds": finished - staged,
                       "bytes_per_receiver": received["delta_bytes"] + received["snapshot_bytes"],
                       "publisher_bytes_sent": received["delta_bytes"] + received["snapshot_bytes"],
                       "kinds": [received["kind"]]})
    setup = {"path": "inprocess", "model": model, "parameters": sum(t.numel() for t in state.values()),
             "dtype": args.dtype, "device": str(device), "receivers": 1, "model_bytes": state_bytes(state)}
    raw = copy_gb_per_s(raw_buffer_bytes(setup["model_bytes"], args.bucket_bytes), device)
    identical = state_checksum(receiver.params) == state_checksum(state)
    return summarize(setup, rounds, raw, checksum_seconds(state, args.bucket_bytes), identical)


# ---------------------------------------------------------------------------------------------- distributed


def member_device(backend: str, rank: int) -> torch.device:
    """NCCL needs one GPU per member; gloo moves CPU tensors."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def publisher_rounds(publisher: WeightPublisher, state: dict, versions: int) -> list[dict]:
    """Publishes versions 0..`versions`; the round records of the publisher."""
    rounds = []
    for version in range(versions + 1):
        if version:
            next_version(state)
        record = publisher.publish(state, version)
        sent = record["delta_bytes"] + record["snapshot_bytes"]
        rounds.append({"version": version, "seconds": record["weight_sync_seconds"],
                       "stage_seconds": record["stage_seconds"], "transfer_seconds": record["transfer_seconds"],
                       "publisher_bytes_sent": sent})
    return rounds


def distributed_member(rank: int, size: int, store_port: int, backend: str, shapes: list, args, results) -> None:
    """One member of the weight-sync group: rank 0 publishes, the others receive. Puts its report on `results`."""
    try:
        set_threads(args.threads)
        device = member_device(backend, rank)
        dtype = getattr(torch, args.dtype)
        state = random_state(shapes, dtype, device) if rank == 0 else zero_state(shapes, dtype, device)
        group = open_sync_group((STORE_HOST, store_port), 0, rank, size, backend, args.timeout_s)
        raw = broadcast_gb_per_s(group.data, raw_buffer_bytes(state_bytes(state), args.bucket_bytes), device)
        transport = group.transport()  # buckets over the group's backend, control messages over gloo
        report = {"rank": rank, "raw_gb_per_s": raw}
        if rank == 0:
            publisher = WeightPublisher(state, transport, args.bucket_bytes)
            report["rounds"] = publisher_rounds(publisher, state, args.versions)
        else:
            receiver = WeightReceiver(state, transport)
            report["received"] = []
            for _ in range(args.versions + 1):
                receiver.sync()
                report["received"].append(receiver.stats())
        report["state_checksum"] = state_checksum(state)
        if rank == 1:  # the verification cost on a receiver's device, once the rounds are over
            report["checksum_seconds"] = checksum_seconds(state, args.bucket_bytes)
        report["model_bytes"] = state_bytes(state)
        report["parameters"] = sum(t.numel() for t in state.values())
        results.put(report)
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})


def collect_reports(results, processes: list, size: int, timeout_s: float) -> dict[int, dict]:
    """Every member's report by rank; the first error is raised with its rank and traceback."""
    reports = {}
    for _ in range(size):
        try:
            report = results.get(timeout=timeout_s)
        except queue.Empty:
            missing = sorted(set(range(size)) - set(reports))
            raise TimeoutError(f"weight-sync members {missing} did not report within {timeout_s} s") from None
        if "error" in report:
            raise RuntimeError(f"weight-sync member rank {report['rank']} failed:\n{report['error']}")
        reports[report["rank"]] = report
    for process in processes:
        process.join(timeout=60)
    return reports


def bench_distributed(backend: str, model: str, receivers: int, args) -> dict:
    """The publisher and `receivers` receivers as spawned processes in one weight-sync group of `backend`."""
    size = receivers + 1
    if backend == "nccl" and torch.cuda.device_count() < size:
        raise ValueError(f"nccl with {receivers} receivers needs {size} GPUs (one per member), "
                         f"this machine has {torch.cuda.device_count()}")
    store = host_store(STORE_HOST, 0)  # port 0: the OS picks a free one; the members need it to the end
    context = torch_mp.get_context("spawn")
    results = context.Queue()
    shapes = parameter_shapes(model)
    processes = [context.Process(target=distributed_member, args=(rank, size, store.port, backend, shapes, args,
                                                                   results), daemon=True)
                 for rank in range(size)]
    for process in processes:
        process.start()
    try:
        reports = collect_reports(results, processes, size, args.timeout_s)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    rounds = reports[0]["rounds"]
    for version, record in enumerate(rounds):
        received = [reports[rank]["received"][version] for rank in range(1, size)]
        record["bytes_per_receiver"] = min(r["delta_bytes"] + r["snapshot_bytes"] for r in received)
        record["kinds"] = sorted({r["kind"] for r in received})
    identical = all(reports[rank]["state_checksum"] == reports[0]["state_checksum"] for rank in range(1, size))
    setup = {"path": backend, "model": model, "parameters": reports[0]["parameters"], "dtype": args.dtype,
             "device": "cpu" if backend == "gloo" else "cuda", "receivers": receivers,
             "model_bytes": reports[0]["model_bytes"]}
    return summarize(setup, rounds, reports[0]["raw_gb_per_s"], reports[1]["checksum_seconds"], identical)


# ------------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    print_markdown_table(
        ["path", "model", "params", "receivers", "MB/version", "snapshot s", "delta s/version", "stage s",
         "transfer s", "GB/s", "aggregate GB/s", "raw GB/s", "checksum s", "identical"],
        [[r["path"], r["model"], f"{r['parameters'] / 1e6:,.1f}M", r["receivers"],
          f"{r['bytes_per_version'] / 1e6:,.1f}",
          *(f"{r[key]:.3f}" for key in ("snapshot_seconds", "seconds_per_version", "stage_seconds", "transfer_seconds",
                                        "gb_per_s", "aggregate_gb_per_s")),
          f"{r['raw_gb_per_s']:.2f}", f"{r['checksum_seconds']:.3f}", r["weights_identical"]] for r in rows])


def jobs(args) -> list[tuple[str, str, int]]:
    """(path, model, receivers) of every measurement, in order."""
    planned = []
    for model in args.models:
        for path in args.paths:
            counts = [1] if path == "inprocess" else args.receivers
            planned += [(path, model, count) for count in counts]
    return planned


def defaults(quick: bool, cuda: bool) -> dict:
    """Values of the options left unset: a measurement, or seconds of the same code paths (`--quick`)."""
    if quick:
        return {"paths": ["inprocess", "nccl" if cuda else "gloo"], "models": ["tiny"], "receivers": [1],
                "versions": 2, "bucket_mb": 0.25}
    return {"paths": ["inprocess", "nccl" if cuda else "gloo"],
            "models": ["tiny", "r1-distill-1.5b" if cuda else "smollm-135m"], "receivers": [1, 2], "versions": 3,
            "bucket_mb": DEFAULT_BUCKET_BYTES / 2**20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--paths", nargs="+", choices=PATHS,
                        help="default: inprocess gloo on the CPU, inprocess nccl with --device cuda")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="default: tiny smollm-135m on the CPU, tiny r1-distill-1.5b with --device cuda")
    parser.add_argument("--receivers", nargs="+", type=int,
                        help="receiver counts of the gloo and nccl paths (inprocess: always 1); default: 1 2")
    parser.add_argument("--versions", type=int, help="delta versions after the snapshot (their median); default: 3")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the published dtype (the rollout engines' model.dtype); default: %(default)s")
    parser.add_argument("--bucket-mb", type=float,
                        help=f"bucket size in MiB; default: the publisher's, {DEFAULT_BUCKET_BYTES >> 20}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="the inprocess path's device; cuda also switches the defaults to GPU ones")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit of a group operation and of a member")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every process (0: torch's default, one per core); on a shared "
                             "machine 1 avoids threads waiting for each other on busy cores")
    parser.add_argument("--quick", action="store_true",
                        help="seconds, for tests: options left unset become the tiny model, 1 receiver, "
                             "2 delta versions, 0.25 MiB buckets")
    parser.add_argument("--out", default="results/bench_weight_sync.json", help="JSON file; default: %(default)s")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    fill_unset(args, defaults(args.quick, cuda))
    if args.versions < 1:
        parser.error(f"--versions must be at least 1 (delta versions are what is timed), got {args.versions}")
    if min(args.receivers) < 1:
        parser.error(f"--receivers must be at least 1 each, got {args.receivers}")
    if args.bucket_mb <= 0:
        parser.error(f"--bucket-mb must be positive, got {args.bucket_mb}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.bucket_bytes = int(args.bucket_mb * 2**20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    report = {"args": vars(args), **machine(), "torch": torch.__version__, "results": [], "errors": {}}
    if args.device == "cuda":
        report["device_name"] = torch.cuda.get_device_name()
    for path, model, receivers in jobs(args):
        label = f"{path} {model} x{receivers}"
        print(f"[{label}] ...", flush=True)
        with keep_going(report["errors"], label):  # one failing path must not lose the others' figures
            if path == "inprocess":
                row = bench_inprocess(model, args, getattr(torch, args.dtype), torch.device(args.device))
            else:
                row = bench_distributed(path, model, receivers, args)
            report["results"].append(row)
            print(f"[{label}] {row['seconds_per_version']:.3f} s/version, {row['gb_per_s']:.3f} GB/s", flush=True)
        write_report(report, args.out)  # after every measurement: a run cut short keeps what it measured
    if report["results"]:
        print_table(report["results"])
    print(f"written to {args.out}")
    mismatched = [f"{r['path']} {r['model']} x{r['receivers']}" for r in report["results"]
                  if not r["weights_identical"]]
    if mismatched:
        print(f"receivers that did not end with the publisher's bits: {mismatched}", file=sys.stderr)
    return 1 if report["errors"] or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
