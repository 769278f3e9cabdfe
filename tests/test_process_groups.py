"""The learner ranks form their world through the driver's store: no rank hosts it, so rank 0 may sit on any node."""

import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from areal_async.actor_system.process_groups import host_store, join_learner_world


def learner_rank(rank: int, store_address: tuple[str, int], results) -> None:
    try:
        join_learner_world(store_address, 2, rank, "gloo", timeout_s=60)
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)
        results.put((rank, float(value)))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, traceback.format_exc()))


def test_two_ranks_meet_through_a_store_the_driver_hosts() -> None:
    store = host_store("127.0.0.1", 0)  # this process is the driver; port 0: the OS picks one
    context = torch_mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=learner_rank, args=(rank, ("127.0.0.1", store.port), results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    try:
        reports = dict(results.get(timeout=90) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
    assert reports == {0: 3.0, 1: 3.0}, reports
