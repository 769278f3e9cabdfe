"""Checkpoints of a whole run: policy and optimizer (torch.distributed.checkpoint, sharded when the learner
is), the version, and the trainer's JSON state (controller, queue, ledger, RNG).

A checkpoint is written into a hidden staging folder and renamed into place, then `latest` is replaced
atomically: a crash while writing leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_run_checkpoint(directory: Path, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Writes checkpoint `step-<step>` under `directory` and points `latest` at it; keeps the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    staging = directory / f".staging-step-{step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging))
    _write_atomically(staging / TRAINER_STATE, json.dumps(trainer_state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _write_atomically(directory / LATEST, final.name)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_run_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_run_checkpoint(path: Path, model, optimizer) -> dict:
    """Loads policy and optimizer in place and returns the trainer state."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    with open(path / TRAINER_STATE, encoding="utf-8") as f:
        return json.load(f)
