"""The decode batch sizes of the built-in engine: one CUDA graph is captured per size, and a decode step over
`count` occupied slots runs on the smallest size that holds them. Powers of two up to 8, then four sizes per
octave (10, 12, 14, 16, 20, 24, ..., 192, 224, 256, 320, ...), so a step computes at most a quarter more rows
than it needs while a 1,024-slot engine captures 31 graphs. The engine (actors/scheduler.py) and the simulator
(areal_async/planning/simulate.py) both size steps with it."""

from __future__ import annotations


def decode_batch_size(count: int, capacity: int) -> int:
    """The batch a decode step runs for `count` occupied slots of `capacity`: at least 2 (a batch of one would be
    a special case for the compiler), capped at `capacity`."""
    if count <= 8:
        size = max(2, 1 << max(0, count - 1).bit_length())
    else:
        step = 1 << ((count - 1).bit_length() - 3)
        size = -(-count // step) * step
    return min(size, capacity)


def decode_batch_sizes(capacity: int) -> list[int]:
    """Every size `decode_batch_size` gives for an engine of `capacity` slots, ascending."""
    return sorted({decode_batch_size(count, capacity) for count in range(1, capacity + 1)})
