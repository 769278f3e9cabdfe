"""The msgpack group frame: exact round trip, raw-bytes arrays, and FrameError for every malformed frame."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_async.types import Trajectory
from areal_async.actor_system.wire import SCHEMA_VERSION, FrameError, decode_group, encode_group


def make_group(group_id="g7", sizes=(3, 0, 5)):
    """A group with one trajectory per output length in `sizes`; awkward float values on purpose."""
    return [
        Trajectory(
            query_id="q-α",
            group_id=group_id,
            sample_index=index,
            prompt_tokens=np.array([101, -2, 2**31 - 1], dtype=np.int32),
            output_tokens=np.arange(size, dtype=np.int32) + 7,
            behaviour_logprobs=np.array([-0.1, -np.inf, -1e-30, -3.4e38, -0.0][:size], dtype=np.float32),
            versions=np.array([4, 4, 5, 6, 6][:size], dtype=np.int32),
            reward=(5.0, -5.0, 0.1)[index % 3],
            finish_reason=("stop", "length", "aborted")[index % 3],
            timings={"generate_s": 1.25, "reward_s": 1e-7} if index == 0 else {},
            loss_mask=np.array([1, 0, 0, 1, 1][:size], dtype=np.uint8) if index == 2 else None,
        )
        for index, size in enumerate(sizes)
    ]


def raw(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False)


def pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def assert_frame_error(message: dict, *words: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_group(pack(message))
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value!s}"


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_preserves_every_field_bit_for_bit():
    group = make_group()
    decoded = decode_group(encode_group(group))
    assert len(decoded) == len(group)
    for before, after in zip(group, decoded):
        for name in ("query_id", "group_id", "sample_index", "reward", "finish_reason", "timings"):
            assert getattr(after, name) == getattr(before, name), name
        for name in ("prompt_tokens", "output_tokens", "behaviour_logprobs", "versions", "loss_mask"):
            array = getattr(after, name)
            assert array.dtype == getattr(before, name).dtype, name
            assert array.tobytes() == getattr(before, name).tobytes(), name  # bit-for-bit, -0.0 and -inf too
            assert array.flags.writeable, name


def test_decoded_arrays_are_writable_and_own_their_memory():
    decoded = decode_group(encode_group(make_group()))
    decoded[0].output_tokens[0] = 99
    decoded[0].behaviour_logprobs[:] = 0.0
    assert decoded[0].output_tokens[0] == 99


def test_frame_carries_raw_little_endian_bytes_not_lists():
    message = raw(encode_group(make_group()))
    assert message["schema"] == SCHEMA_VERSION and message["kind"] == "group" and message["group_id"] == "g7"
    versions = message["trajectories"][0]["versions"]
    assert versions == {"dtype": "<i4", "shape": [3], "data": np.array([4, 4, 5], "<i4").tobytes()}
    for entry in message["trajectories"]:
        for name in ("prompt_tokens", "output_tokens", "behaviour_logprobs", "versions"):
            assert isinstance(entry[name]["data"], bytes), name
    assert message["trajectories"][0]["behaviour_logprobs"]["dtype"] == "<f4"


def test_encoding_refuses_mixed_groups_empty_groups_and_ints_that_do_not_fit():
    with pytest.raises(ValueError, match="mixed"):
        encode_group(make_group("a", (1,)) + make_group("b", (1,)))
    with pytest.raises(ValueError, match="at least one"):
        encode_group([])
    group = make_group(sizes=(1,))
    group[0].versions = np.array([2**40])
    with pytest.raises(ValueError, match="versions values do not fit"):
        encode_group(group)


# ---------------------------------------------------------------------------------------------- frame errors


def valid_message() -> dict:
    return raw(encode_group(make_group()))


def test_truncated_frame():
    frame = encode_group(make_group())
    with pytest.raises(FrameError, match="not one complete msgpack message"):
        decode_group(frame[:-1])


def test_trailing_bytes_after_the_frame():
    with pytest.raises(FrameError, match="not one complete msgpack message"):
        decode_group(encode_group(make_group()) + b"\x00")


def test_not_a_map():
    with pytest.raises(FrameError, match="frame: expected dict, got list"):
        decode_group(pack([1, 2]))


def test_missing_schema():
    message = valid_message()
    del message["schema"]
    assert_frame_error(message, "missing key 'schema'")


@pytest.mark.parametrize("schema", [1, 3, 0, "2", True, None])
def test_wrong_schema_version_says_expected_and_got(schema):
    message = valid_message()
    message["schema"] = schema
    assert_frame_error(message, "frame.schema", f"expected schema version {SCHEMA_VERSION}", f"got {schema!r}")


def test_wrong_kind():
    message = valid_message()
    message["kind"] = "weights"
    assert_frame_error(message, "frame.kind", "'weights'")


@pytest.mark.parametrize("key", ["group_id", "trajectories", "kind"])
def test_missing_frame_key(key):
    message = valid_message()
    del message[key]
    assert_frame_error(message, f"missing key {key!r}")


@pytest.mark.parametrize("key", ["query_id", "sample_index", "reward", "finish_reason", "timings", "versions"])
def test_missing_trajectory_key(key):
    message = valid_message()
    del message["trajectories"][1][key]
    assert_frame_error(message, "trajectories[1]", f"missing key {key!r}")


def test_missing_array_key():
    message = valid_message()
    del message["trajectories"][0]["output_tokens"]["shape"]
    assert_frame_error(message, "trajectories[0].output_tokens", "missing key 'shape'")


def test_unknown_key():
    message = valid_message()
    message["trajectories"][2]["temperature"] = 1.0
    assert_frame_error(message, "trajectories[2]", "unknown key 'temperature'")


@pytest.mark.parametrize(
    "path, value, words",
    [
        (("group_id",), 7, ("frame.group_id", "expected str, got int")),
        (("trajectories",), {"a": 1}, ("frame.trajectories", "expected list, got dict")),
        ((0,), "not a map", ("trajectories[0]", "expected dict, got str")),
        ((0, "sample_index"), True, ("trajectories[0].sample_index", "expected int, got bool")),
        ((0, "sample_index"), 1.0, ("trajectories[0].sample_index", "expected int, got float")),
        ((1, "reward"), "5", ("trajectories[1].reward", "expected float, got str")),
        ((1, "query_id"), b"q", ("trajectories[1].query_id", "expected str, got bytes")),
        ((0, "timings"), [1.0], ("trajectories[0].timings", "expected dict, got list")),
        ((0, "timings", "generate_s"), 1, ("trajectories[0].timings['generate_s']", "expected float, got int")),
        ((0, "versions"), [4, 4, 5], ("trajectories[0].versions", "expected dict, got list")),
        ((0, "versions", "data"), [4, 4, 5], ("trajectories[0].versions.data", "expected bytes, got list")),
        ((0, "versions", "shape"), 3, ("trajectories[0].versions.shape", "expected list, got int")),
        ((0, "versions", "dtype"), 4, ("trajectories[0].versions.dtype", "expected str, got int")),
    ],
)
def test_wrong_type(path, value, words):
    message = valid_message()
    target = message if path[0] in ("group_id", "trajectories") else message["trajectories"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert_frame_error(message, *words)


@pytest.mark.parametrize("dtype", ["<i8", ">i4", "float32", "<U1"])
def test_dtype_not_allowed(dtype):
    message = valid_message()
    message["trajectories"][0]["output_tokens"]["dtype"] = dtype
    assert_frame_error(message, "trajectories[0].output_tokens.dtype", "not an allowed dtype")


def test_allowed_dtype_on_the_wrong_field():
    message = valid_message()
    message["trajectories"][0]["versions"]["dtype"] = "<f4"
    assert_frame_error(message, "trajectories[0].versions.dtype", "expected '<i4', got '<f4'")


@pytest.mark.parametrize("shape", [[], [3, 1], [-1], [True], ["3"]])
def test_bad_shape(shape):
    message = valid_message()
    message["trajectories"][0]["versions"]["shape"] = shape
    assert_frame_error(message, "trajectories[0].versions.shape")


@pytest.mark.parametrize("change", [lambda d: d[:-1], lambda d: d + b"\x00", lambda d: d[:2]])
def test_data_length_not_matching_shape(change):
    message = valid_message()
    array = message["trajectories"][0]["behaviour_logprobs"]
    array["data"] = change(array["data"])
    assert_frame_error(message, "trajectories[0].behaviour_logprobs.data", "does not match shape [3]")


def test_inconsistent_group_ids():
    message = valid_message()
    message["trajectories"][2]["group_id"] = "g8"
    assert_frame_error(message, "trajectories[2].group_id", "inconsistent group ids")


def test_invalid_finish_reason_is_a_frame_error():
    message = valid_message()
    message["trajectories"][1]["finish_reason"] = "timeout"
    assert_frame_error(message, "trajectories[1]", "finish_reason 'timeout'")


def test_arrays_of_unequal_length_are_a_frame_error():
    message = valid_message()
    message["trajectories"][0]["versions"] = {"dtype": "<i4", "shape": [1], "data": b"\x00" * 4}
    assert_frame_error(message, "trajectories[0]", "must have equal length")


def test_empty_group():
    message = valid_message()
    message["trajectories"] = []
    assert_frame_error(message, "frame.trajectories", "empty")


# ---------------------------------------------------------------------------------------------- fuzzing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_frame_error_and_nothing_else(garbage):
    with pytest.raises(FrameError):
        decode_group(garbage)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_damaged_frame_decodes_or_raises_frame_error(data):
    frame = bytearray(encode_group(make_group()))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_group(bytes(frame))
    except FrameError:
        return
    assert all(isinstance(t, Trajectory) for t in decoded)
