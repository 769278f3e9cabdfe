"""The torch.distributed world of a Ray run: learner ranks 0..M-1, then the rollout workers.

Two groups are carved out of it, created by every process in this order:
  1. the learner group (ranks 0..M-1): FSDP's all-gathers and reduce-scatters;
  2. the weight-sync group (learner rank 0 and every worker): learner rank 0 publishes each version there.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def join_run_world(address: str, world_size: int, rank: int, backend: str, num_learner_ranks: int):
    """Joins the run's world and creates its two groups (every process of the run calls this).
    Returns (learner group, weight-sync group); a process outside a group gets GroupMember.NON_GROUP_MEMBER."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, init_method=address, world_size=world_size, rank=rank)
    learner_group = dist.new_group(list(range(num_learner_ranks)))
    sync_group = dist.new_group([0, *range(num_learner_ranks, world_size)])
    return learner_group, sync_group
