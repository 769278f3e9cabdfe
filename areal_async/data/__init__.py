"""Prompt sets: AReaL's formats, generic JSONL, and the synthetic arithmetic task."""

from __future__ import annotations

import dataclasses
import random

from areal_async.data.loaders import (
    PROMPT_LOADERS,
    VALID_TASKS,
    load_areal_jsonl,
    load_code_jsonl,
    load_areal_prompts,
    load_jsonl,
    load_prompts,
)
from areal_async.data.records import DatasetError, PromptRecord
from areal_async.errors import InputError
from areal_async.data.synthetic import arithmetic_problems
from areal_async.data.synthetic_code import code_table_problems
from areal_async.data.synthetic_products import product_problems
from areal_async.prompts import PLACEHOLDER, prompt_format, wrap

__all__ = [
    "PROMPT_LOADERS",
    "VALID_TASKS",
    "DatasetError",
    "PromptRecord",
    "arithmetic_problems",
    "load_areal_jsonl",
    "load_code_jsonl",
    "load_areal_prompts",
    "load_jsonl",
    "load_prompts",
    "load_train_and_heldout",
    "prompt_template",
]


def prompt_template(config) -> str | None:
    """The template a DataConfig puts around every prompt: data.prompt_type's or data.prompt_template; ValueError
    when both are set, the type is unknown or the template has no {problem}."""
    if config.prompt_type is not None and config.prompt_template is not None:
        raise ValueError("set data.prompt_type or data.prompt_template, not both")
    if config.prompt_type is not None:
        return prompt_format(config.prompt_type).template
    if config.prompt_template is not None and PLACEHOLDER not in config.prompt_template:
        raise InputError(f"data.prompt_template must contain {PLACEHOLDER!r}, got {config.prompt_template!r}")
    return config.prompt_template


def _load_file(config, path: str) -> list[PromptRecord]:
    kind = config.kind.value
    if kind == "areal_prompts":
        if not config.id2info_path:
            raise InputError("data.kind=areal_prompts needs data.id2info_path (the id2info.json file)")
        records = load_areal_prompts(path, config.id2info_path)
    elif kind == "areal_jsonl":
        records = load_areal_jsonl(path)
    elif kind == "code_jsonl":
        records = load_code_jsonl(path)
    else:
        records = load_jsonl(path)
    template = prompt_template(config)
    if template is None:
        return records
    return [dataclasses.replace(record, prompt=wrap(template, record.prompt)) for record in records]


def _with_gold(records: list[PromptRecord]) -> list[PromptRecord]:
    """Drops records without any non-empty gold answer: they could never be rewarded."""
    return [r for r in records if any(s.strip() for s in r.solutions)]


def load_train_and_heldout(config) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The training prompts and the held-out prompts described by a DataConfig."""
    if config.kind.value == "synthetic":
        if config.prompt_type is not None or config.prompt_template is not None:
            raise ValueError("data.kind=synthetic writes its own prompts: unset data.prompt_type and data.prompt_template")
        train = arithmetic_problems(config.num_train, config.arithmetic, seed=config.seed, held_out=False)
        heldout = arithmetic_problems(config.num_heldout, config.arithmetic, seed=config.seed + 1, held_out=True)
        return train, heldout
    if config.kind.value == "synthetic_products":
        return (product_problems(config.num_train, seed=config.seed, held_out=False),
                product_problems(config.num_heldout, seed=config.seed + 1, held_out=True))
    if config.kind.value == "synthetic_code":
        if config.prompt_type is not None or config.prompt_template is not None:
            raise ValueError("data.kind=synthetic_code writes its own prompts: unset data.prompt_type and "
                             "data.prompt_template")
        return (code_table_problems(config.num_train, seed=config.seed, held_out=False),
                code_table_problems(config.num_heldout, seed=config.seed + 1, held_out=True))
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
