"""The sharded replay queue between rollout workers and the learner (DESIGN.md invariants 1 and 2).

Workers put one msgpack frame per finished group; a group goes to shard `shard_for(group_id, K)`. Each
shard is a bounded FIFO of whole groups and counts what it received (`ShardCounts`): every received group
is queued, then consumed by the learner or dropped with a reason. A full shard refuses a frame without
receiving it (backpressure: the worker keeps the group and retries). Groups too stale for the training
step that asks for them are dropped at `take`.

`ReplayQueueShard` imports no Ray: the Ray application wraps each shard as an actor. `ShardedReplayQueue`
is the in-process facade over K shards.
"""

from __future__ import annotations

import base64
import logging
import math
import zlib
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from pathlib import Path

from areal_async.actor_system.ledger import DROP_REASONS, ShardCounts, check_reason
from areal_async.actor_system.staleness import is_too_stale
from areal_async.actor_system.trajectory_log import TrajectoryLog
from areal_async.types import Trajectory
from areal_async.actor_system.wire import FrameError, decode_group, encode_group

logger = logging.getLogger(__name__)

LAST_ERRORS_KEPT = 8  # bad-frame messages kept per shard for diagnostics
# receipts kept per shard: a group's delivery is reported right after its put, or its worker died seconds ago
RECEIPTS_KEPT = 65536

Group = list[Trajectory]


def shard_for(group_id: str, num_shards: int) -> int:
    """The shard of a group, the same in every process (crc32, not Python's per-process salted hash)."""
    return zlib.crc32(group_id.encode("utf-8")) % num_shards


def group_oldest_version(group: Sequence[Trajectory]) -> int:
    """The oldest policy version among the group's output tokens; -1 if no trajectory has any token."""
    return min((int(t.versions.min()) for t in group if len(t.versions)), default=-1)


def is_zero_variance(group: Sequence[Trajectory]) -> bool:
    """Every scored sample got the same reward, or at most one was scored (a NaN reward: the verifier could not
    judge it): the group-normalised advantages are all zero, nothing to learn."""
    return len({t.reward for t in group if not math.isnan(t.reward)}) <= 1


def round_robin_quotas(depths: Sequence[int], start: int, wanted: int) -> tuple[list[int], int | None]:
    """Deal `wanted` groups one at a time over K shards holding `depths` [K] groups, in turn from shard
    `start`, skipping empty shards. Returns the quota of each shard [K] and the shard dealt the last group
    (None if nothing was dealt)."""
    order = [(start + offset) % len(depths) for offset in range(len(depths))]
    quotas = [0] * len(depths)
    last = None
    while wanted > 0:
        dealt = False
        for shard in order:
            if wanted > 0 and quotas[shard] < depths[shard]:
                quotas[shard] += 1
                wanted -= 1
                last = shard
                dealt = True
        if not dealt:
            break
    return quotas, last


def shard_log_path(log_dir: str | Path | None, shard_index: int) -> Path | None:
    return None if log_dir is None else Path(log_dir) / f"shard-{shard_index}"


class ReplayQueueShard:
    """One FIFO of whole, decoded groups with its own counts and (optionally) its own trajectory log.

    max_staleness: None = unbounded. filter_zero_variance: drop groups whose rewards are all equal (the
    configuration's ppo.filter_zero_variance_groups; with group size 1 it must be off, or nothing trains).
    keep_receipts: remember the outcome of each put (the newest RECEIPTS_KEPT) until a snapshot shows that the
    controller knows the group was delivered: a worker puts a group and only then reports its delivery, so a
    run checkpoint taken while workers generate (`snapshot`) and the settlement of a worker that died between
    the two (`receipts_for`) ask the shard what it received.
    """

    def __init__(
        self,
        shard_index: int,
        capacity_groups: int,
        max_staleness: int | None,
        log_path: str | Path | None = None,
        *,
        filter_zero_variance: bool = True,
        keep_receipts: bool = False,
    ) -> None:
        if capacity_groups < 1:
            raise ValueError(f"capacity_groups must be at least 1, got {capacity_groups}")
        self.shard_index = shard_index
        self.capacity_groups = capacity_groups
        self.max_staleness = max_staleness
        self.filter_zero_variance = filter_zero_variance
        self.counts = ShardCounts()
        self.last_errors: deque[str] = deque(maxlen=LAST_ERRORS_KEPT)
        self._groups: deque[Group] = deque()
        self._log = TrajectoryLog(log_path) if log_path is not None else None
        self._receipts: OrderedDict[str, str] | None = OrderedDict() if keep_receipts else None

    @property
    def depth(self) -> int:
        return len(self._groups)

    def put(self, frame: bytes, group_id: str | None = None) -> str:
        """Receive one group frame (of group `group_id`, as its sender names it). Returns "full" (not received,
        nothing counted: retry later), "queued", or the drop reason it was counted under: "bad_frame" or
        "zero_variance". Never raises on bad bytes."""
        if self.depth >= self.capacity_groups:
            return "full"
        outcome = self._receive(frame)
        self.counts.receive(outcome)
        if self._receipts is not None and group_id is not None:
            self._receipts[group_id] = outcome
            if len(self._receipts) > RECEIPTS_KEPT:
                self._receipts.popitem(last=False)
        return outcome

    def receipts_for(self, group_ids: Collection[str]) -> dict[str, str]:
        """The outcome of each of `group_ids` this shard received (those it did not are left out)."""
        receipts = self._receipts or {}
        return {group_id: receipts[group_id] for group_id in group_ids if group_id in receipts}

    def _receive(self, frame: bytes) -> str:
        try:
            group = decode_group(frame)
        except FrameError as error:
            message = str(error)
            logger.warning("replay queue shard %d dropped a bad frame: %s", self.shard_index, message)
            self.last_errors.append(message)
            return "bad_frame"
        if self.filter_zero_variance and is_zero_variance(group):
            return "zero_variance"
        self._groups.append(group)
        return "queued"

    def take(self, max_groups: int, training_step: int) -> tuple[list[Group], int]:
        """Pop up to `max_groups` groups in FIFO order for training step `training_step`.

        Groups too stale for that step are dropped ("stale") on the way and do not count toward
        max_groups. Returns (groups taken, counted as consumed and logged; number dropped as stale).
        """
        taken: list[Group] = []
        stale = 0
        while self._groups and len(taken) < max_groups:
            group = self._groups.popleft()
            if is_too_stale(group_oldest_version(group), training_step, self.max_staleness):
                self.counts.drop_queued("stale")
                stale += 1
            else:
                taken.append(group)
        if taken and self._log is not None:
            try:
                self._log.append([t for group in taken for t in group], consumed_at_step=training_step)
            except BaseException:
                self._groups.extendleft(reversed(taken))  # not consumed after all: back to the front, in order
                raise
        self.counts.consume(len(taken))
        return taken, stale

    def snapshot(self, in_flight_ids: Collection[str] = ()) -> dict:
        """Queued groups (as wire frames) and counts, for a run checkpoint.

        A worker puts a group here and only then tells the controller it delivered it, so a controller snapshot
        taken just before this one may still count as in flight a group that this shard already received.
        `receipts` maps each such group of `in_flight_ids` (the controller snapshot's in-flight groups) to its
        outcome here; receipts of groups the controller knew were delivered are forgotten.
        """
        receipts = {}
        if self._receipts is not None:
            in_flight = set(in_flight_ids)
            receipts = {gid: outcome for gid, outcome in self._receipts.items() if gid in in_flight}
            self._receipts = OrderedDict(receipts)
        frames = [base64.b64encode(encode_group(group)).decode("ascii") for group in self._groups]  # JSON-able
        return {"frames": frames, "counts": self.counts.state_dict(), "receipts": receipts}

    def load_state_dict(self, state: dict, resume_step: int) -> None:
        """Restores a checkpoint taken before training step `resume_step`; the trajectory log forgets what
        was consumed from that step on."""
        self._groups = deque(decode_group(base64.b64decode(frame)) for frame in state["frames"])
        self.counts = ShardCounts.from_state_dict(state["counts"])
        if self._log is not None:
            self._log.truncate_before_step(resume_step)

    def current_depth(self) -> int:
        """`depth` as a method, so that a remote (Ray) shard answers it too."""
        return self.depth

    def get_counts(self) -> ShardCounts:
        return self.counts

    def drain(self, reason: str = "shutdown") -> int:
        """Drop every queued group with `reason`; returns how many."""
        check_reason(reason)  # before anything moves, so the counts stay balanced
        drained = self.depth
        self._groups.clear()
        if drained:
            self.counts.drop_queued(reason, drained)
        return drained

    def stats(self) -> dict:
        """The shard's counts and state as a JSON-able dict."""
        return {
            "shard_index": self.shard_index,
            "depth": self.depth,
            "capacity_groups": self.capacity_groups,
            "received": self.counts.received,
            "queued": self.counts.queued,
            "consumed": self.counts.consumed,
            "dropped": {reason: self.counts.dropped.get(reason, 0) for reason in DROP_REASONS},
            "last_errors": list(self.last_errors),
        }

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


class ShardedReplayQueue:
    """K shards in one process. Groups are routed by `shard_for`; `take` serves shards in turn.

    log_dir: each shard logs what it hands out to `log_dir/shard-<i>` (a zarr group), if given.
    """

    def __init__(
        self,
        num_shards: int,
        capacity_per_shard: int,
        max_staleness: int | None,
        log_dir: str | Path | None = None,
        *,
        filter_zero_variance: bool = True,
        keep_receipts: bool = False,
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        self.shards = [
            ReplayQueueShard(
                index,
                capacity_per_shard,
                max_staleness,
                log_path=shard_log_path(log_dir, index),
                filter_zero_variance=filter_zero_variance,
                keep_receipts=keep_receipts,
            )
            for index in range(num_shards)
        ]
        self._last_served = num_shards - 1  # the first take starts at shard 0

    @classmethod
    def over(cls, shards: Sequence) -> "ShardedReplayQueue":
        """A facade over existing shards: any objects with ReplayQueueShard's methods (e.g. Ray proxies)."""
        queue = cls.__new__(cls)
        queue.shards = list(shards)
        queue._last_served = len(queue.shards) - 1
        return queue

    @property
    def depth(self) -> int:
        return sum(shard.current_depth() for shard in self.shards)

    def room(self) -> int:
        """Groups one round may still put without meeting a full shard, were they all routed to one (local
        shards)."""
        return min(shard.capacity_groups - shard.current_depth() for shard in self.shards)

    def put(self, group_id: str, frame: bytes) -> str:
        """Hand a group frame to its shard; returns the shard's outcome ("full", "queued" or a drop reason)."""
        return self.shards[shard_for(group_id, len(self.shards))].put(frame, group_id)

    def take(self, num_groups: int, training_step: int) -> tuple[list[Group], int]:
        """Up to `num_groups` groups for training step `training_step`, dealt one at a time over the shards
        in turn, starting after the shard served last. Returns (groups, number dropped as stale)."""
        taken: list[Group] = []
        stale = 0
        while len(taken) < num_groups:
            start = (self._last_served + 1) % len(self.shards)
            depths = [shard.current_depth() for shard in self.shards]
            quotas, last = round_robin_quotas(depths, start, num_groups - len(taken))
            if last is None:
                break
            for offset in range(len(self.shards)):
                index = (start + offset) % len(self.shards)
                if quotas[index]:
                    groups, dropped = self.shards[index].take(quotas[index], training_step)
                    taken.extend(groups)
                    stale += dropped
            self._last_served = last
        return taken, stale

    def snapshot(self, in_flight_ids: Collection[str] = ()) -> list[dict]:
        """Every shard's `snapshot` (taken right after the controller's)."""
        return [shard.snapshot(in_flight_ids) for shard in self.shards]

    def receipts_for(self, group_ids: Collection[str]) -> dict[str, str]:
        """What the shards received of `group_ids` (group id -> outcome)."""
        return {gid: outcome for shard in self.shards for gid, outcome in shard.receipts_for(group_ids).items()}

    def load_state_dict(self, state: list[dict], resume_step: int) -> None:
        if len(state) != len(self.shards):
            raise ValueError(f"checkpoint has {len(state)} queue shards, the run has {len(self.shards)}: "
                             "rollout.num_queue_shards must not change on resume")
        for shard, shard_state in zip(self.shards, state):
            shard.load_state_dict(shard_state, resume_step)

    def shard_counts(self) -> list[ShardCounts]:
        return [shard.get_counts() for shard in self.shards]

    def drain(self, reason: str = "shutdown") -> int:
        """Drop everything queued in every shard with `reason`; returns how many groups."""
        return sum(shard.drain(reason) for shard in self.shards)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
