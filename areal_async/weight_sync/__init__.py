"""Versioned, bucketed, checksummed weight publication (DESIGN.md, "Weight publication"; invariant 3).

After every training step learner rank 0 publishes version v of the policy weights; every rollout engine that
asks gets either a delta over its version (when it holds v - 1) or a full snapshot (fresh engine, late joiner,
missed version), and afterwards holds exactly the learner's bits.

- `bits`: weights as integer bit patterns (exact XOR deltas) and the checksum that compares them;
- `layout`: parameters packed into flat per-dtype buckets, computed the same on both sides;
- `protocol`: releases, the messages that take a receiver to a version, headers and acknowledgements;
- `transports`: moving the messages (in process; a torch.distributed group: gloo on CPU, NCCL on GPU);
- `endpoints`: the publisher (stages versions, forms deltas) and the receiver (verifies, then applies).
"""

from areal_async.weight_sync.bits import bits_checksum, bits_of, splitmix64, state_checksum
from areal_async.weight_sync.endpoints import WeightPublisher, WeightReceiver
from areal_async.weight_sync.layout import (
    DEFAULT_BUCKET_BYTES, ParamSpec, gather_bucket, param_specs, plan_buckets, scatter_bucket,
)
from areal_async.weight_sync.protocol import (
    MAX_SNAPSHOT_REFETCHES, Ack, BrokenRound, MessageKind, WeightSyncError, decode_header, encode_header,
)
from areal_async.weight_sync.transports import (
    InProcessTransport, TorchDistributedTransport, WeightTransport, should_broadcast,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES", "MAX_SNAPSHOT_REFETCHES", "Ack", "BrokenRound", "InProcessTransport", "MessageKind", "ParamSpec",
    "TorchDistributedTransport", "WeightPublisher", "WeightReceiver", "WeightSyncError", "WeightTransport",
    "bits_checksum", "bits_of", "decode_header", "encode_header", "gather_bucket", "param_specs", "plan_buckets",
    "scatter_bucket", "should_broadcast", "splitmix64", "state_checksum",
]
