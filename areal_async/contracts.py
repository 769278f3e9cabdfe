"""What the run asks of the parts, as typing.Protocols: a generation engine (the built-in one or vLLM), a learner
(in-process or the Ray learner ranks), the controller service, the replay queue (in-process shards or Ray
proxies) and a weight transport (areal_async.weight_sync's WeightTransport: in process or a torch.distributed
group). The run is typed against these; `tests/test_contracts.py` checks that every implementation provides
them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from areal_async.actor_system.ledger import ShardCounts
from areal_async.types import Generation, PromptGroup, SamplingParams, Trajectory
from areal_async.weight_sync import WeightTransport

__all__ = ["Controller", "GenerationEngine", "Learner", "ReplayQueue", "WeightTransport", "Workflow"]


@runtime_checkable
class GenerationEngine(Protocol):
    """Samples continuations of prompts with per-token behaviour logprobs and the version of every token."""

    version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 weight_update: Callable[[], bool] | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """One Generation per prompt, in order. `weight_update` is called at token boundaries; when it returns
        True it swapped in new weights and the engine recomputes its KV cache before going on.
        `max_new_tokens`: each request's own token limit (default params.max_new_tokens)."""

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Takes these weights (named as the model's parameters) and adopts `version`."""


@runtime_checkable
class Learner(Protocol):
    """Trains the policy: one step per call, producing version + 1."""

    version: int

    def train_step(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> dict[str, float]:
        """One step on `trajectories` with their advantages (computed over the whole batch); returns its stats."""

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The full weights, named as the model's parameters, in the dtype the engines hold."""

    def save_state(self, staging: Path) -> None:
        """Policy, optimizer and schedule into a run checkpoint's staging folder."""

    def load_state(self, path: Path) -> None:
        """Restores what `save_state` wrote."""


@runtime_checkable
class Controller(Protocol):
    """Admission under the staleness rule, delivery receipts, re-admission, the stop flag, statistics."""

    def admit_groups(self, max_groups: int, worker: int | None = None) -> list[PromptGroup]: ...

    def delivered(self, group_id: str, dropped: bool = False, solved: float | None = None) -> None: ...

    def readmit(self, groups: Sequence[PromptGroup], reason: str, traceback: str = "") -> None: ...

    def free_slots(self, groups: int) -> None: ...

    def report_generation(self, tokens: int, generate_s: float, reward_s: float = 0.0,
                          reward_failures: dict[str, int] | Counter | None = None, reward_sum: float = 0.0,
                          scored: int = 0, episodes: dict[str, int] | Counter | None = None) -> None: ...

    def set_version(self, version: int) -> None: ...

    def counts(self) -> dict: ...

    def stop(self) -> None: ...


@runtime_checkable
class Workflow(Protocol):
    """An agent (areal_async/agents/workflows.py), built as cls(WorkflowContext): plays one episode with `client`
    (OpenAI-shaped, backed by the run's engine) and returns its reward, or {completion id: reward}."""

    async def run(self, data: dict, client) -> float | dict[str, float]: ...


@runtime_checkable
class ReplayQueue(Protocol):
    """Groups from the workers to the learner, with the staleness filter and the ledger's counts."""

    def put(self, group_id: str, frame: bytes) -> str: ...

    def take(self, max_groups: int, training_step: int) -> tuple[list[list[Trajectory]], int]: ...

    def shard_counts(self) -> list[ShardCounts]: ...

    def receipts_for(self, group_ids: Collection[str]) -> dict[str, str]: ...

    def drain(self, reason: str = "shutdown") -> int: ...
