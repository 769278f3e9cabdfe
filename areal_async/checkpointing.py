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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from areal_async.files import write_text_atomically

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def stage_checkpoint(directory: Path, step: int) -> Path:
    """An empty staging folder for checkpoint `step-<step>` under `directory` (what a crash leaves there is
    never read)."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".staging-step-{step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def learner_state(learner) -> dict:
    """What a learner rank checkpoints: policy, optimizer and learning-rate schedule (sharded tensors stay
    sharded). `learner` has .model, .optimizer and .scheduler."""
    model_state, optimizer_state = get_state_dict(learner.model, learner.optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "lr_scheduler": learner.scheduler.state_dict()}


def save_learner_state(staging: Path, learner, group: dist.ProcessGroup | None = None) -> None:
    """Writes `learner`'s state into `staging`; with several learner ranks every rank of `group` calls it."""
    dcp.save(learner_state(learner), checkpoint_id=str(staging), process_group=group)


def commit_checkpoint(directory: Path, step: int, staging: Path, trainer_state: dict, keep: int = 2) -> Path:
    """Adds the trainer's JSON state to the staged checkpoint, renames it into place as `step-<step>`, points
    `latest` at it and keeps the newest `keep`."""
    final = directory / f"step-{step:08d}"
    write_text_atomically(staging / TRAINER_STATE, json.dumps(trainer_state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    write_text_atomically(directory / LATEST, final.name)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_run_checkpoint(directory: Path, step: int, learner, trainer_state: dict, keep: int = 2) -> Path:
    """A whole checkpoint written by one process (the learner lives in it)."""
    staging = stage_checkpoint(directory, step)
    save_learner_state(staging, learner)
    return commit_checkpoint(directory, step, staging, trainer_state, keep)


def latest_run_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_learner_state(path: Path, learner, group: dist.ProcessGroup | None = None) -> None:
    """Loads policy, optimizer and learning-rate schedule in place (every learner rank of `group` calls it)."""
    state = learner_state(learner)
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(learner.model, learner.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    learner.scheduler.load_state_dict(state["lr_scheduler"])


def read_trainer_state(path: Path) -> dict:
    with open(path / TRAINER_STATE, encoding="utf-8") as f:
        return json.load(f)
