"""An append-only zarr v3 log of the trajectories the learner consumed, for analysis after a run.

Layout of the zarr group (N trajectories, O output tokens, P prompt tokens in total):

    output_tokens [O] int32, behaviour_logprobs [O] float32, versions [O] int32,
    loss_mask [O] uint8                                                           ragged, concatenated
    prompt_tokens [P] int32                                                       ragged, concatenated
    output_offsets [N] int64, prompt_offsets [N] int64     cumulative END offsets into the ragged arrays
    reward [N] float32, sample_index [N] int32, consumed_at_step [N] int32
    group_id, query_id, finish_reason [N] vlen-utf8 strings (zarr 3's variable-length string type)
    timings [N] vlen-utf8 strings, each a JSON object

Every array is 1-D, resizable and chunked, so an append writes only the chunks it touches. The group's
attributes hold the committed lengths (N, O, P) and are written last: an append interrupted by a crash
is not committed, and re-opening the log cuts the arrays back to the committed lengths before appending.
One writer per log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr

from areal_async.types import Trajectory

TOKEN_CHUNK = 65536  # elements per chunk of the ragged token arrays
ROW_CHUNK = 8192  # elements per chunk of the per-trajectory arrays

# name -> (dtype, which length indexes it: "output" tokens, "prompt" tokens or "rows" = trajectories)
_ARRAYS = {
    "output_tokens": ("int32", "output"),
    "behaviour_logprobs": ("float32", "output"),
    "versions": ("int32", "output"),
    "loss_mask": ("uint8", "output"),
    "prompt_tokens": ("int32", "prompt"),
    "output_offsets": ("int64", "rows"),
    "prompt_offsets": ("int64", "rows"),
    "reward": ("float32", "rows"),
    "sample_index": ("int32", "rows"),
    "consumed_at_step": ("int32", "rows"),
    "group_id": (str, "rows"),
    "query_id": (str, "rows"),
    "finish_reason": (str, "rows"),
    "timings": (str, "rows"),
}
_LENGTH_ATTRS = {"rows": "num_trajectories", "output": "num_output_tokens", "prompt": "num_prompt_tokens"}
ADDED_LATER = {"loss_mask": 1}  # arrays a log written before them lacks, with the value they stand for


class TrajectoryLog:
    """Appends consumed trajectories to the zarr group at `path`, creating it or resuming an existing one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        group = zarr.open_group(str(self.path), mode="a")
        self._group: zarr.Group | None = group
        if _LENGTH_ATTRS["rows"] in group.attrs:
            self._lengths = _committed_lengths(group)
            for name, value in ADDED_LATER.items():
                if name not in group:
                    dtype, length = _ARRAYS[name]
                    group.create_array(name, shape=(self._lengths[length],), dtype=dtype, fill_value=value,
                                       chunks=(TOKEN_CHUNK,))
            self._arrays = {name: group[name] for name in _ARRAYS}
            for name, (_, length) in _ARRAYS.items():  # cut off a torn, uncommitted append
                self._arrays[name].resize((self._lengths[length],))
        else:
            self._arrays = {
                name: group.create_array(name, shape=(0,), dtype=dtype, overwrite=True,
                                         chunks=(ROW_CHUNK if length == "rows" else TOKEN_CHUNK,))
                for name, (dtype, length) in _ARRAYS.items()
            }
            self._commit({length: 0 for length in _LENGTH_ATTRS})

    @property
    def num_trajectories(self) -> int:
        return self._lengths["rows"]

    def append(self, trajectories: Sequence[Trajectory], consumed_at_step: int) -> None:
        """Append the trajectories the learner consumed for training step `consumed_at_step`."""
        if self._group is None:
            raise RuntimeError(f"trajectory log {self.path} is closed")
        if not trajectories:
            return
        columns = _columns(trajectories, consumed_at_step, self._lengths)
        new_lengths = {
            "rows": self._lengths["rows"] + len(trajectories),
            "output": self._lengths["output"] + len(columns["output_tokens"]),
            "prompt": self._lengths["prompt"] + len(columns["prompt_tokens"]),
        }
        for name, (_, length) in _ARRAYS.items():
            array = self._arrays[name]
            array.resize((new_lengths[length],))
            array[self._lengths[length]:new_lengths[length]] = columns[name]
        self._commit(new_lengths)

    def truncate_before_step(self, step: int) -> None:
        """Forget the rows consumed at `step` or later (a run resumed from the checkpoint taken before it)."""
        steps = self._arrays["consumed_at_step"][: self._lengths["rows"]]
        rows = int(np.searchsorted(np.asarray(steps), step, side="left"))  # rows are appended in step order
        if rows == self._lengths["rows"]:
            return
        ends = {"output": self._arrays["output_offsets"], "prompt": self._arrays["prompt_offsets"]}
        lengths = {"rows": rows, **{name: int(array[rows - 1]) if rows else 0 for name, array in ends.items()}}
        for name, (_, length) in _ARRAYS.items():
            self._arrays[name].resize((lengths[length],))
        self._commit(lengths)

    def close(self) -> None:
        """Stop appending (what was appended is already on disk)."""
        self._group = None

    def _commit(self, lengths: dict[str, int]) -> None:
        self._group.attrs.update({_LENGTH_ATTRS[length]: n for length, n in lengths.items()})
        self._lengths = dict(lengths)


def _columns(trajectories: Sequence[Trajectory], consumed_at_step: int, lengths: dict[str, int]) -> dict:
    """Column values of `trajectories` for every array; offsets continue from the committed `lengths`."""
    output_lengths = [len(t.output_tokens) for t in trajectories]
    prompt_lengths = [len(t.prompt_tokens) for t in trajectories]
    return {
        "output_tokens": _concatenate([t.output_tokens for t in trajectories], np.int32),
        "behaviour_logprobs": _concatenate([t.behaviour_logprobs for t in trajectories], np.float32),
        "versions": _concatenate([t.versions for t in trajectories], np.int32),
        "loss_mask": _concatenate([t.loss_mask for t in trajectories], np.uint8),
        "prompt_tokens": _concatenate([t.prompt_tokens for t in trajectories], np.int32),
        "output_offsets": lengths["output"] + np.cumsum(output_lengths, dtype=np.int64),
        "prompt_offsets": lengths["prompt"] + np.cumsum(prompt_lengths, dtype=np.int64),
        "reward": np.array([t.reward for t in trajectories], dtype=np.float32),
        "sample_index": np.array([t.sample_index for t in trajectories], dtype=np.int32),
        "consumed_at_step": np.full(len(trajectories), consumed_at_step, dtype=np.int32),
        "group_id": np.array([t.group_id for t in trajectories], dtype=str),
        "query_id": np.array([t.query_id for t in trajectories], dtype=str),
        "finish_reason": np.array([t.finish_reason for t in trajectories], dtype=str),
        "timings": np.array([json.dumps(t.timings) for t in trajectories], dtype=str),
    }


def _concatenate(arrays: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    """The 1-D arrays [n_i] joined end to end: [sum n_i] of `dtype`."""
    return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays])


def _committed_lengths(group: zarr.Group) -> dict[str, int]:
    return {length: int(group.attrs[attr]) for length, attr in _LENGTH_ATTRS.items()}


def read_trajectory_log(path: str | Path) -> Iterator[dict]:
    """Yield every committed trajectory of the log at `path` as a dict: the Trajectory fields (arrays as
    numpy arrays [n] of the stored dtype, strings as str, timings as a dict) plus consumed_at_step."""
    group = zarr.open_group(str(path), mode="r")
    lengths = _committed_lengths(group)
    columns = {name: group[name][: lengths[length]] if name in group else
               np.full(lengths[length], ADDED_LATER[name], dtype=dtype) for name, (dtype, length) in _ARRAYS.items()}
    output_starts = np.concatenate([[0], columns["output_offsets"][:-1]]).astype(np.int64)
    prompt_starts = np.concatenate([[0], columns["prompt_offsets"][:-1]]).astype(np.int64)
    for row in range(lengths["rows"]):
        output = slice(output_starts[row], columns["output_offsets"][row])
        prompt = slice(prompt_starts[row], columns["prompt_offsets"][row])
        yield {
            "query_id": str(columns["query_id"][row]),
            "group_id": str(columns["group_id"][row]),
            "sample_index": int(columns["sample_index"][row]),
            "prompt_tokens": columns["prompt_tokens"][prompt],
            "output_tokens": columns["output_tokens"][output],
            "behaviour_logprobs": columns["behaviour_logprobs"][output],
            "versions": columns["versions"][output],
            "loss_mask": columns["loss_mask"][output],
            "reward": float(columns["reward"][row]),
            "finish_reason": str(columns["finish_reason"][row]),
            "timings": json.loads(str(columns["timings"][row])),
            "consumed_at_step": int(columns["consumed_at_step"][row]),
        }
