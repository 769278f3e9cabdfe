"""Weight publishing: layout, exact XOR deltas, checksums, versions/snapshots, and the transports."""

from __future__ import annotations

import socket
import traceback
from collections import OrderedDict
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from areal_async.model import CausalLM, DecoderConfig
from areal_async.weight_sync import (
    MAX_SNAPSHOT_REFETCHES,
    InProcessTransport,
    MessageKind,
    ParamSpec,
    TorchDistributedTransport,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    bits_checksum,
    bits_of,
    decode_header,
    encode_header,
    gather_bucket,
    param_specs,
    plan_buckets,
    scatter_bucket,
    should_broadcast,
    splitmix64,
    state_checksum,
)
from areal_async.weight_sync import bits as bit_patterns
from conftest import TINY

SMALL_BUCKET_BYTES = 1024


# ----------------------------------------------------------------------------------------- helpers


def model_like_state(seed: int) -> OrderedDict[str, torch.Tensor]:
    """A few tensors shaped like a tiny decoder: fp32 and bf16, one larger than SMALL_BUCKET_BYTES."""
    g = torch.Generator().manual_seed(seed)
    shapes = [("embed.weight", (40, 16), torch.float32), ("layers.0.attn.qkv.weight", (48, 16), torch.bfloat16),
              ("layers.0.norm.weight", (16,), torch.float32), ("layers.0.mlp.weight", (16, 16), torch.bfloat16),
              ("layers.1.norm.weight", (16,), torch.float32), ("lm_head.weight", (40, 16), torch.bfloat16),
              ("frozen.bias", (16,), torch.float32)]
    return OrderedDict((name, (torch.randn(shape, generator=g) * 0.1).to(dtype)) for name, shape, dtype in shapes)


def zeros_like_state(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, torch.zeros_like(t)) for name, t in state.items())


def adamw_like_step(state: dict[str, torch.Tensor], g: torch.Generator, version: int) -> None:
    """p <- p (1 - lr wd) - lr m / (sqrt(v) + eps), computed in fp32 and rounded to the parameter's dtype.

    Norms move every third version, the mlp every other one, frozen.bias never: some buckets are unchanged.
    """
    lr, weight_decay = 1e-3, 0.01
    for name, p in state.items():
        if name == "frozen.bias" or ("norm" in name and version % 3) or ("mlp" in name and version % 2):
            continue
        m = torch.randn(p.shape, generator=g)
        v = torch.rand(p.shape, generator=g) + 0.1
        p.copy_((p.float() * (1 - lr * weight_decay) - lr * m / (v.sqrt() + 1e-8)).to(p.dtype))


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(bits_of(actual[name]), bits_of(expected[name])), name
    assert state_checksum(actual) == state_checksum(expected)


def random_bit_patterns(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Uniform random bits reinterpreted as `dtype`: NaNs with payloads, infs, subnormals, -0.0 included."""
    bits_dtype = bits_of(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(bits_dtype)
    words = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(bits_dtype)
    words.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")], dtype=dtype).view(bits_dtype)
    return words.view(dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- bits/checksum


def splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def test_splitmix64_matches_reference() -> None:
    seeds = [0, 1, 2, 12345, 2**40 + 7, 2**63 - 1, -1, -(2**63)]
    got = splitmix64(torch.tensor(seeds, dtype=torch.int64)).tolist()
    assert got == [splitmix64_reference(s) for s in seeds]
    assert got[0] == splitmix64_reference(0) == 0xE220A8397B1DCDAF - (1 << 64)  # splitmix64's first output


@pytest.mark.parametrize("bits_dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_checksum_detects_every_single_bit_flip_tried(bits_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    n = 3 * bit_patterns._CHECKSUM_ROW + 777  # several rows and a ragged tail
    info = torch.iinfo(bits_dtype)
    words = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(bits_dtype)
    reference = bits_checksum(words).item()
    assert bits_checksum(words.clone()).item() == reference
    width = words.element_size() * 8
    positions = torch.randint(0, n, (12,), generator=g).tolist() + [0, n - 1]
    bits = torch.randint(0, width, (14,), generator=g).tolist()
    for position, bit in zip(positions, bits + [width - 1]):  # the sign bit included
        flipped = words.clone()
        flipped.view(torch.uint8)[position * words.element_size() + bit // 8] ^= 1 << (bit % 8)
        assert bits_checksum(flipped).item() != reference, (position, bit)
    swapped = words.clone()
    swapped[[5, n - 5]] = words[[n - 5, 5]]
    assert words[5] != words[n - 5] and bits_checksum(swapped).item() != reference


def test_checksum_does_not_depend_on_span(monkeypatch: pytest.MonkeyPatch) -> None:
    words = torch.randint(-2**31, 2**31 - 1, (5 * bit_patterns._CHECKSUM_ROW + 123,), dtype=torch.int64)
    words = words.to(torch.int32)
    default = bits_checksum(words).item()
    monkeypatch.setattr(bit_patterns, "_CHECKSUM_SPAN", 2 * bit_patterns._CHECKSUM_ROW)
    assert bits_checksum(words).item() == default


def test_state_checksum_compares_bits_names_and_shapes() -> None:
    state = model_like_state(0)
    assert state_checksum(state) == state_checksum(OrderedDict((k, v.clone()) for k, v in state.items()))
    zero = OrderedDict(w=torch.zeros(4))
    assert state_checksum(zero) != state_checksum(OrderedDict(w=-torch.zeros(4)))  # -0.0 == 0.0 as floats
    assert state_checksum(zero) != state_checksum(OrderedDict(v=torch.zeros(4)))
    assert state_checksum(zero) != state_checksum(OrderedDict(w=torch.zeros(2, 2)))
    nan = OrderedDict(w=torch.full((3,), float("nan")))
    assert state_checksum(nan) == state_checksum(OrderedDict(w=nan["w"].clone()))


# -------------------------------------------------------------------------------------------- layout


def test_layout_is_deterministic_and_covers_every_element_once() -> None:
    state = model_like_state(0)
    state["zero_sized"] = torch.empty(0, 4)
    layout = plan_buckets(param_specs(state), SMALL_BUCKET_BYTES)
    assert layout == plan_buckets(param_specs(model_like_state(1) | {"zero_sized": torch.empty(0, 4)}),
                                  SMALL_BUCKET_BYTES)
    placed: list[str] = []
    for bucket in layout.buckets:
        assert {state[slot.name].dtype for slot in bucket.slots} == {bucket.dtype}
        offset = 0
        for slot in bucket.slots:  # back to back, no gaps or overlaps
            assert slot.offset == offset and slot.numel == state[slot.name].numel()
            offset += slot.numel
        assert bucket.numel == offset
        assert bucket.nbytes <= SMALL_BUCKET_BYTES or len(bucket.slots) == 1
        placed += [slot.name for slot in bucket.slots]
    assert sorted(placed) == sorted(state)
    # dtypes in order of first appearance; the oversized tensors sit alone
    assert [b.dtype for b in layout.buckets] == [torch.float32] * 2 + [torch.bfloat16] * 3
    alone = {b.slots[0].name for b in layout.buckets if len(b.slots) == 1}
    assert {"embed.weight", "layers.0.attn.qkv.weight", "lm_head.weight"} <= alone
    # one bucket when everything fits; a different shape or name gives a different fingerprint
    assert len(plan_buckets(param_specs(state), 1 << 20).buckets) == 2
    changed = [ParamSpec("embed.weight", (40, 17), torch.float32)] + list(layout.specs[1:])
    assert plan_buckets(changed, SMALL_BUCKET_BYTES).fingerprint != layout.fingerprint


def test_gather_then_scatter_reproduces_every_tensor() -> None:
    state = model_like_state(0)
    layout = plan_buckets(param_specs(state), SMALL_BUCKET_BYTES)
    restored = zeros_like_state(state)
    for bucket in layout.buckets:
        words = torch.empty(bucket.numel, dtype=bucket.bits_dtype)
        gather_bucket(bucket, state, words)
        scatter_bucket(bucket, words, restored)
    assert_bitwise_equal(restored, state)


def test_header_roundtrip_and_broadcast_rule() -> None:
    header = {"version": 3, "kind": "delta", "checksums": [-(2**63), 2**63 - 1], "buckets": [1], "broadcast": True}
    assert decode_header(encode_header(header)) == header
    delta, snapshot = MessageKind.DELTA, MessageKind.SNAPSHOT
    assert should_broadcast({1: delta, 2: delta}, group_size=3)
    assert not should_broadcast({1: delta}, group_size=3)  # rank 2 sits this round out
    assert not should_broadcast({1: delta, 2: snapshot}, group_size=3)


# ------------------------------------------------------------------------------------ exact deltas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_xor_deltas_are_exact_on_arbitrary_bit_patterns(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    state = OrderedDict(a=random_bit_patterns((33, 7), dtype, g), b=random_bit_patterns((300,), dtype, g))
    transport = InProcessTransport()
    publisher = WeightPublisher(state, transport, bucket_bytes=256)
    receiver = WeightReceiver(zeros_like_state(state), transport)
    for version in range(4):
        for t in state.values():  # rewrite a random subset of elements with fresh random bit patterns
            fresh = random_bit_patterns(t.shape, dtype, g)
            keep = torch.rand(t.shape, generator=g) < 0.7
            t.copy_(torch.where(keep, t, fresh))
        publisher.publish(state, version)
        receiver.sync()
        assert receiver.stats()["kind"] == ("snapshot" if version == 0 else "delta")
        assert_bitwise_equal(receiver.params, state)


# ------------------------------------------------------------------------------ in-process protocol


def test_in_process_versions_deltas_snapshots_and_late_joiners() -> None:
    g = torch.Generator().manual_seed(3)
    state = model_like_state(0)
    transport = InProcessTransport()
    publisher = WeightPublisher(state, transport, bucket_bytes=SMALL_BUCKET_BYTES)
    every_version = WeightReceiver(zeros_like_state(state), transport)
    skips_10_to_14 = WeightReceiver(zeros_like_state(state), transport)
    late_joiner: WeightReceiver | None = None
    skipped_bucket_versions = 0
    for version in range(55):
        if version:
            adamw_like_step(state, g, version)
        record = publisher.publish(state, version)
        skipped_bucket_versions += record["changed_buckets"] < record["total_buckets"]
        if version == 30:
            late_joiner = WeightReceiver(zeros_like_state(state), transport)
        receivers = [every_version] + [skips_10_to_14] * (not 10 <= version <= 14) + [late_joiner] * (version >= 30)
        for receiver in receivers:
            assert receiver.sync() == version
            assert_bitwise_equal(receiver.params, state)
        assert every_version.stats()["kind"] == ("snapshot" if version == 0 else "delta")
        if version == 15:
            assert skips_10_to_14.stats()["kind"] == "snapshot"
        if version == 30:
            assert late_joiner.stats()["kind"] == "snapshot"
        if version == 31:
            assert late_joiner.stats()["kind"] == "delta"
    assert skipped_bucket_versions >= 20  # frozen.bias and rarely-moving norms share an unchanged bucket
    snapshot_bytes = every_version.history[0]["snapshot_bytes"]
    assert snapshot_bytes == sum(t.numel() * t.element_size() for t in state.values())
    delta_bytes = [r["delta_bytes"] for r in every_version.history[1:]]
    assert all(0 < b <= snapshot_bytes for b in delta_bytes) and min(delta_bytes) < snapshot_bytes
    assert every_version.sync() == 54 and every_version.stats()["kind"] == "current"
    assert set(publisher.stats()) >= {"weight_sync_seconds", "delta_bytes", "snapshot_bytes"}


def test_receiver_updates_model_parameters_in_place(tiny_model: CausalLM) -> None:
    torch.manual_seed(1)
    actor_model = CausalLM(DecoderConfig(**TINY))
    actor_params = dict(actor_model.named_parameters())
    addresses = {name: p.data_ptr() for name, p in actor_params.items()}
    transport = InProcessTransport()
    publisher = WeightPublisher(dict(tiny_model.named_parameters()), transport, bucket_bytes=4096)
    receiver = WeightReceiver(actor_params, transport)
    for version in range(3):
        with torch.no_grad():
            for p in tiny_model.parameters():
                p.mul_(0.99)
        publisher.publish(dict(tiny_model.named_parameters()), version)
        receiver.sync()
    assert {name: p.data_ptr() for name, p in actor_model.named_parameters()} == addresses
    assert_bitwise_equal(dict(actor_model.named_parameters()), dict(tiny_model.named_parameters()))
    tokens = torch.randint(0, TINY["vocab_size"], (2, 9))
    assert torch.equal(actor_model(tokens), tiny_model(tokens))


class DamageInTransit:
    """Flips one bit of the first bucket of the next `damaged` messages received (a transport mix-in)."""

    damaged = 0

    def fetch(self, held_version, bucket_buffer):
        header, filled = super().fetch(held_version, bucket_buffer)
        if not self.damaged:
            return header, filled
        self.damaged -= 1
        return header, self._flip_first(filled, bucket_buffer)

    @staticmethod
    def _flip_first(filled, bucket_buffer):
        for position, index in enumerate(filled):
            if position == 0:
                bucket_buffer(index).view(torch.uint8)[7] ^= 0x10
            yield index


class BitFlippingTransport(DamageInTransit, InProcessTransport):
    pass


class DamagingGlooTransport(DamageInTransit, TorchDistributedTransport):
    pass


@pytest.mark.parametrize("corrupt_version", [0, 4])  # a snapshot, a delta
def test_a_corrupted_bucket_is_refetched_as_a_snapshot_in_the_same_round(corrupt_version: int) -> None:
    g = torch.Generator().manual_seed(4)
    state = model_like_state(0)
    transport = BitFlippingTransport()
    publisher = WeightPublisher(state, transport, bucket_bytes=SMALL_BUCKET_BYTES)
    receiver = WeightReceiver(zeros_like_state(state), transport)
    for version in range(corrupt_version + 2):
        if version:
            adamw_like_step(state, g, version)
        publisher.publish(state, version)
        transport.damaged = 1 if version == corrupt_version else 0
        assert receiver.sync() == version
        assert_bitwise_equal(receiver.params, state)
        assert receiver.stats()["refetched_snapshots"] == (version == corrupt_version)
        if version == corrupt_version:
            assert receiver.stats()["kind"] == "snapshot"
    assert receiver.history[-1]["kind"] == "delta"  # the version after the repaired one


def test_damage_that_persists_gives_up_and_the_next_round_recovers() -> None:
    g = torch.Generator().manual_seed(4)
    state = model_like_state(0)
    transport = BitFlippingTransport()
    publisher = WeightPublisher(state, transport, bucket_bytes=SMALL_BUCKET_BYTES)
    receiver = WeightReceiver(zeros_like_state(state), transport)
    publisher.publish(state, 0)
    transport.damaged = 1 + MAX_SNAPSHOT_REFETCHES
    with pytest.raises(WeightSyncError, match=r"version 0 \(snapshot\): buckets \[\d+\] do not match.*2 snapshots"):
        receiver.sync()
    assert receiver.version == -1 and transport.damaged == 0
    adamw_like_step(state, g, 1)
    publisher.publish(state, 1)
    assert receiver.sync() == 1 and receiver.stats()["kind"] == "snapshot"
    assert_bitwise_equal(receiver.params, state)


def test_layout_mismatch_names_the_first_differing_parameter() -> None:
    state = model_like_state(0)
    transport = InProcessTransport()
    publisher = WeightPublisher(state, transport, bucket_bytes=SMALL_BUCKET_BYTES)
    publisher.publish(state, 0)
    reshaped = zeros_like_state(state)
    reshaped["layers.0.mlp.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    with pytest.raises(WeightSyncError, match=r"layout mismatch.*#3.*'layers.0.mlp.weight' \(16, 16\).*\(16, 8\)"):
        WeightReceiver(reshaped, transport).sync()
    missing = zeros_like_state(state)
    del missing["frozen.bias"]
    with pytest.raises(WeightSyncError, match=r"7 parameters, receiver 6.*only the publisher has: 'frozen.bias'"):
        WeightReceiver(missing, transport).sync()
    with pytest.raises(WeightSyncError, match=r"parameters differ.*'layers.0.mlp.weight'"):
        publisher.publish(reshaped, 1)
    with pytest.raises(WeightSyncError, match="does not follow"):
        publisher.publish(state, 0)


# ------------------------------------------------------------------------------- gloo, 3 processes

GLOO_VERSIONS = 24
GLOO_WORLD = 3
GLOO_MISSED = range(8, 13)  # rank 2 sits these versions out, then catches up with a snapshot
GLOO_DAMAGED = 16  # rank 2 receives this version's delta damaged and re-fetches a snapshot in the round


def gloo_participants(version: int) -> list[int]:
    return [1] if version in GLOO_MISSED else [1, 2]


def gloo_worker(rank: int, port: int, results) -> None:
    """Rank 0 publishes GLOO_VERSIONS versions; ranks 1, 2 sync when they participate; all report checksums."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=GLOO_WORLD, rank=rank,
                                timeout=timedelta(seconds=60))
        transport = DamagingGlooTransport()
        state = model_like_state(0)
        checksums, kinds = {}, {}
        if rank == 0:
            g = torch.Generator().manual_seed(5)
            publisher = WeightPublisher(state, transport, bucket_bytes=SMALL_BUCKET_BYTES)
            for version in range(GLOO_VERSIONS):
                if version:
                    adamw_like_step(state, g, version)
                publisher.publish(state, version, receivers=gloo_participants(version))
                checksums[version] = state_checksum(state)
                kinds[version] = (publisher.stats()["delta_bytes"], publisher.stats()["snapshot_bytes"])
        else:
            state = zeros_like_state(state)
            receiver = WeightReceiver(state, transport)
            for version in range(GLOO_VERSIONS):
                if rank in gloo_participants(version):
                    transport.damaged = int(rank == 2 and version == GLOO_DAMAGED)
                    assert receiver.sync() == version
                    checksums[version] = state_checksum(state)
                    kinds[version] = receiver.stats()["kind"]
        results.put((rank, checksums, kinds, state_checksum(state)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc(), None))


def test_gloo_publisher_and_two_receivers_across_processes() -> None:
    context = torch_mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=gloo_worker, args=(rank, port, results)) for rank in range(GLOO_WORLD)]
    for process in processes:
        process.start()
    try:
        reports = {}
        for _ in range(GLOO_WORLD):
            rank, checksums, kinds, final = results.get(timeout=60)
            assert checksums != "error", f"rank {rank} failed:\n{kinds}"
            reports[rank] = (checksums, kinds, final)
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
    published, sent, final = reports[0]
    assert reports[1][0] == published and reports[1][2] == final
    assert reports[2][0] == {v: c for v, c in published.items() if v not in GLOO_MISSED} and reports[2][2] == final
    assert reports[1][1] == {v: "snapshot" if v == 0 else "delta" for v in range(GLOO_VERSIONS)}
    assert reports[2][1][GLOO_MISSED.stop] == "snapshot" and reports[2][1][GLOO_DAMAGED] == "snapshot"
    assert [k for v, k in reports[2][1].items() if v not in (0, GLOO_MISSED.stop, GLOO_DAMAGED)] == ["delta"] * 16
    snapshot_bytes = sent[0][1]  # version 0: one broadcast snapshot for both receivers
    assert sent[GLOO_MISSED.stop] == (sent[GLOO_MISSED.stop][0], snapshot_bytes)  # rank 1 delta, rank 2 snapshot
    assert sent[1][1] == 0 and 0 < sent[1][0] < snapshot_bytes
    assert sent[GLOO_DAMAGED] == (sent[GLOO_DAMAGED][0], snapshot_bytes)  # the broadcast delta, then a snapshot

