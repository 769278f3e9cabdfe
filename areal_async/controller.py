"""The rollout controller: walks the prompt set epoch by epoch and admits groups under the staleness rule."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from areal_async.data.records import PromptRecord
from areal_async.ledger import Ledger
from areal_async.staleness import may_admit
from areal_async.types import PromptGroup


class RolloutController:
    """Admits prompt groups in a seeded order; `cursor` (prompts handed out) is all that is needed to resume."""

    def __init__(
        self,
        records: Sequence[PromptRecord],
        encode: Callable[[str], list[int]],
        group_size: int,
        groups_per_step: int,
        max_staleness: int | None,
        seed: int,
        ledger: Ledger,
    ) -> None:
        if not records:
            raise ValueError("the prompt set is empty")
        self.records = list(records)
        self.encode = encode
        self.group_size = group_size
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.seed = seed
        self.ledger = ledger
        self.cursor = 0
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _record_at(self, position: int) -> PromptRecord:
        epoch, offset = divmod(position, len(self.records))
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self.records[self._epoch_order[1][offset]]

    def admit(self, current_version: int) -> PromptGroup | None:
        """The next group, or None while the staleness rule forbids admitting one."""
        if not may_admit(self.cursor, current_version, self.max_staleness, self.groups_per_step):
            return None
        record = self._record_at(self.cursor)
        group = PromptGroup(
            group_id=f"g{self.cursor}",
            query_id=record.query_id,
            prompt=record.prompt,
            prompt_tokens=np.asarray(self.encode(record.prompt), dtype=np.int32),
            solutions=record.solutions,
            group_size=self.group_size,
            admitted_at_version=current_version,
        )
        self.cursor += 1
        self.ledger.admit()
        return group

    def admit_all(self, current_version: int) -> list[PromptGroup]:
        groups = []
        while (group := self.admit(current_version)) is not None:
            groups.append(group)
        return groups
