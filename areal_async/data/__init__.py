"""Prompt sets: AReaL's formats, generic JSONL, and the synthetic arithmetic task."""

from __future__ import annotations

import random

from areal_async.data.loaders import (
    PROMPT_LOADERS,
    VALID_TASKS,
    load_areal_jsonl,
    load_areal_prompts,
    load_jsonl,
    load_prompts,
)
from areal_async.data.records import DatasetError, PromptRecord
from areal_async.data.synthetic import arithmetic_problems

__all__ = [
    "PROMPT_LOADERS",
    "VALID_TASKS",
    "DatasetError",
    "PromptRecord",
    "arithmetic_problems",
    "load_areal_jsonl",
    "load_areal_prompts",
    "load_jsonl",
    "load_prompts",
    "load_train_and_heldout",
]


def _load_file(config, path: str) -> list[PromptRecord]:
    kind = config.kind.value
    if kind == "areal_prompts":
        if not config.id2info_path:
            raise ValueError("data.kind=areal_prompts needs data.id2info_path (the id2info.json file)")
        return load_areal_prompts(path, config.id2info_path)
    if kind == "areal_jsonl":
        return load_areal_jsonl(path)
    return load_jsonl(path, template=config.prompt_template)


def _with_gold(records: list[PromptRecord]) -> list[PromptRecord]:
    """Drops records without any non-empty gold answer: they could never be rewarded."""
    return [r for r in records if any(s.strip() for s in r.solutions)]


def load_train_and_heldout(config) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The training prompts and the held-out prompts described by a DataConfig."""
    if config.kind.value == "synthetic":
        train = arithmetic_problems(config.num_train, config.arithmetic, seed=config.seed, held_out=False)
        heldout = arithmetic_problems(config.num_heldout, config.arithmetic, seed=config.seed + 1, held_out=True)
        return train, heldout
    if not config.path:
        raise ValueError(f"data.kind={config.kind.value} needs data.path")
    records = _with_gold(_load_file(config, config.path))
    if config.heldout_path:
        return records, _with_gold(_load_file(config, config.heldout_path))
    shuffled = records[:]
    random.Random(config.seed).shuffle(shuffled)
    if len(shuffled) <= config.num_heldout:
        raise ValueError(
            f"{config.path}: {len(shuffled)} records cannot be split into training and {config.num_heldout} held-out"
        )
    return shuffled[config.num_heldout :], shuffled[: config.num_heldout]
