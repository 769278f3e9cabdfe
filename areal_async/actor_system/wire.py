"""The msgpack wire format of finished groups (DESIGN.md, "The data unit").

One frame carries one finished group:

    {"schema": 2, "kind": "group", "group_id": str, "trajectories": [trajectory map, ...]}

A trajectory map carries every `Trajectory` field. Its arrays travel as
`{"dtype": "<i4" | "<f4" | "|u1", "shape": [n], "data": <n * itemsize raw little-endian bytes>}`, never as lists.
Frames come from other processes and machines, so `decode_group` trusts nothing: whatever is wrong with a
frame, it raises `FrameError` naming the problem and where it is, and never any other exception.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np

from areal_async.types import Trajectory

SCHEMA_VERSION = 2  # 2: loss_mask
FRAME_KIND = "group"

# The wire dtype of each array field of a Trajectory.
ARRAY_DTYPES = {"prompt_tokens": "<i4", "output_tokens": "<i4", "behaviour_logprobs": "<f4", "versions": "<i4",
                "loss_mask": "|u1"}
ALLOWED_DTYPES = ("<i4", "<f4", "|u1")

_FRAME_KEYS = ("schema", "kind", "group_id", "trajectories")
_ARRAY_KEYS = ("dtype", "shape", "data")
# Scalar fields of a Trajectory and the msgpack type each one must decode to (timings: str -> float map).
_SCALAR_TYPES = {"query_id": str, "group_id": str, "sample_index": int, "reward": float, "finish_reason": str,
                 "timings": dict}
_TRAJECTORY_KEYS = tuple(_SCALAR_TYPES) + tuple(ARRAY_DTYPES)


class FrameError(ValueError):
    """A byte string is not a valid group frame; the message says what is wrong and in which field."""


# ---------------------------------------------------------------------------------------------- encoding


def encode_group(trajectories: Sequence[Trajectory]) -> bytes:
    """One frame for a finished group: the G trajectories of one prompt, all with the same group_id.

    Raises ValueError for an empty group, mixed group ids, or array values that do not fit the wire dtype.
    """
    if not trajectories:
        raise ValueError("encode_group: a group needs at least one trajectory")
    group_id = trajectories[0].group_id
    other_ids = sorted({t.group_id for t in trajectories} - {group_id})
    if other_ids:
        raise ValueError(f"encode_group: one frame is one group, but group ids {group_id!r} and {other_ids} are mixed")
    message = {
        "schema": SCHEMA_VERSION,
        "kind": FRAME_KIND,
        "group_id": str(group_id),
        "trajectories": [_trajectory_to_map(t) for t in trajectories],
    }
    return msgpack.packb(message, use_bin_type=True)


def _trajectory_to_map(trajectory: Trajectory) -> dict:
    """Every Trajectory field as msgpack-native values (numpy scalars converted, arrays as raw bytes)."""
    fields = {
        "query_id": str(trajectory.query_id),
        "group_id": str(trajectory.group_id),
        "sample_index": int(trajectory.sample_index),
        "reward": float(trajectory.reward),
        "finish_reason": str(trajectory.finish_reason),
        "timings": {str(name): float(seconds) for name, seconds in trajectory.timings.items()},
    }
    for name, dtype in ARRAY_DTYPES.items():
        fields[name] = _array_to_map(getattr(trajectory, name), dtype, name)
    return fields


def _array_to_map(values: np.ndarray, dtype: str, name: str) -> dict:
    """A 1-D array [n] as {"dtype", "shape": [n], "data": n * itemsize little-endian bytes}."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"encode_group: {name} must be 1-D, got shape {array.shape}")
    wire = array.astype(dtype)
    # Integers must survive the cast exactly; float64 logprobs are rounded to float32 on purpose.
    if wire.dtype.kind in "iu" and not np.array_equal(wire, array):
        raise ValueError(f"encode_group: {name} values do not fit the wire dtype {dtype}")
    return {"dtype": dtype, "shape": [len(wire)], "data": wire.tobytes()}


# ---------------------------------------------------------------------------------------------- decoding


def decode_group(frame: bytes) -> list[Trajectory]:
    """The trajectories of a frame made by `encode_group`, with writable arrays of the wire dtypes.

    Raises FrameError (and nothing else) for anything that is not a valid, complete group frame.
    """
    message = _unpack(frame)
    _require_type(message, dict, "frame")
    _check_schema(message)
    _check_keys(message, _FRAME_KEYS, "frame")
    if message["kind"] != FRAME_KIND:
        raise FrameError(f"frame.kind: expected {FRAME_KIND!r}, got {message['kind']!r}")
    group_id = _require_type(message["group_id"], str, "frame.group_id")
    entries = _require_type(message["trajectories"], list, "frame.trajectories")
    if not entries:
        raise FrameError(f"frame.trajectories: group {group_id!r} is empty")
    trajectories = [_trajectory_from_map(entry, f"trajectories[{k}]") for k, entry in enumerate(entries)]
    for k, trajectory in enumerate(trajectories):
        if trajectory.group_id != group_id:
            raise FrameError(f"trajectories[{k}].group_id: {trajectory.group_id!r} differs from the frame's "
                             f"group id {group_id!r} (inconsistent group ids)")
    return trajectories


def _unpack(frame: bytes) -> object:
    """The single msgpack object `frame` holds."""
    try:
        return msgpack.unpackb(frame, raw=False)
    except Exception as error:  # msgpack signals bad bytes with many exception types; all mean one thing here
        raise FrameError(f"frame is not one complete msgpack message ({type(error).__name__}: {error})") from error


def _check_schema(message: dict) -> None:
    if "schema" not in message:
        raise FrameError(f"frame: missing key 'schema' (expected schema version {SCHEMA_VERSION})")
    schema = message["schema"]
    if type(schema) is not int or schema != SCHEMA_VERSION:  # type(): True == 1 must not pass
        raise FrameError(f"frame.schema: expected schema version {SCHEMA_VERSION}, got {schema!r}")


def _check_keys(mapping: dict, expected: Sequence[str], where: str) -> None:
    """The map has exactly the expected keys: a missing or unknown key is a schema mismatch."""
    missing = [key for key in expected if key not in mapping]
    if missing:
        raise FrameError(f"{where}: missing key {missing[0]!r}")
    unknown = [key for key in mapping if key not in expected]
    if unknown:
        raise FrameError(f"{where}: unknown key {unknown[0]!r}")


def _require_type(value: object, expected: type, where: str):
    """`value` if it is of the expected msgpack type (bool does not count as int)."""
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise FrameError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _trajectory_from_map(entry: object, where: str) -> Trajectory:
    _require_type(entry, dict, where)
    _check_keys(entry, _TRAJECTORY_KEYS, where)
    fields = {name: _require_type(entry[name], kind, f"{where}.{name}") for name, kind in _SCALAR_TYPES.items()}
    fields["timings"] = _timings_from_map(fields["timings"], f"{where}.timings")
    for name, dtype in ARRAY_DTYPES.items():
        fields[name] = _array_from_map(entry[name], dtype, f"{where}.{name}")
    try:
        return Trajectory(**fields)
    except ValueError as error:  # the Trajectory's own checks: equal lengths, known finish_reason
        raise FrameError(f"{where}: {error}") from error


def _timings_from_map(timings: dict, where: str) -> dict[str, float]:
    for name, seconds in timings.items():
        _require_type(name, str, f"{where} key")
        _require_type(seconds, float, f"{where}[{name!r}]")
    return timings


def _array_from_map(value: object, dtype: str, where: str) -> np.ndarray:
    """A writable 1-D array [n] of `dtype` from its {"dtype", "shape", "data"} map."""
    _require_type(value, dict, where)
    _check_keys(value, _ARRAY_KEYS, where)
    wire_dtype = _require_type(value["dtype"], str, f"{where}.dtype")
    if wire_dtype not in ALLOWED_DTYPES:
        raise FrameError(f"{where}.dtype: {wire_dtype!r} is not an allowed dtype {ALLOWED_DTYPES}")
    if wire_dtype != dtype:
        raise FrameError(f"{where}.dtype: expected {dtype!r}, got {wire_dtype!r}")
    shape = _require_type(value["shape"], list, f"{where}.shape")
    if len(shape) != 1 or not isinstance(shape[0], int) or isinstance(shape[0], bool) or shape[0] < 0:
        raise FrameError(f"{where}.shape: expected [n] with one non-negative integer, got {shape!r}")
    data = _require_type(value["data"], bytes, f"{where}.data")
    itemsize = np.dtype(dtype).itemsize
    if len(data) != shape[0] * itemsize:
        raise FrameError(f"{where}.data: data length {len(data)} bytes does not match shape {shape} of {dtype} "
                         f"({shape[0] * itemsize} bytes)")
    return np.frombuffer(data, dtype=dtype).copy()  # copy: frombuffer over bytes is read-only
