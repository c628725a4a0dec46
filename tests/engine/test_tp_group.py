"""TPGroup collectives on two gloo ranks, and a collective that one rank never joins
failing within the timeout instead of hanging."""

from __future__ import annotations

import time

import torch
from tp_harness import spawn_ranks

from tandem.engine.parallel import ParallelConfig, TPGroup, init_tp_group

TIMEOUT_S = 3.0


def _rank(rank: int, world_size: int, init_method: str) -> dict:
    pc = ParallelConfig(
        world_size=world_size, rank=rank, init_method=init_method, timeout_s=TIMEOUT_S
    )
    group = init_tp_group(pc, torch.device("cpu"))
    try:
        t = torch.full((2, 3), float(rank + 1))
        summed = group.all_reduce(t)
        gathered = group.all_gather(torch.full((2, 1), float(rank)), dim=1)
        low = group.all_reduce_min(10 + rank)
        group.barrier()
        out = {"same": summed is t, "sum": summed.tolist(), "gather": gathered.tolist()}
        out["min"] = low
        if rank == 0:  # rank 1 never joins this one
            t0 = time.monotonic()
            try:
                group.all_reduce(torch.ones(1))
                out["timeout"] = "no error"
            except RuntimeError:
                out["timeout"] = time.monotonic() - t0
        else:
            time.sleep(TIMEOUT_S + 2)
        return out
    finally:
        group.destroy()


def test_collectives_and_timeout_on_two_ranks():
    outs = spawn_ranks(_rank, timeout_s=60)
    for rank in (0, 1):
        assert outs[rank]["same"]  # in place
        assert outs[rank]["sum"] == [[3.0] * 3] * 2
        assert outs[rank]["gather"] == [[0.0, 1.0]] * 2
        assert outs[rank]["min"] == 10
    assert isinstance(outs[0]["timeout"], float), outs[0]["timeout"]
    assert outs[0]["timeout"] < TIMEOUT_S + 10


def test_world_size_one_is_a_no_op_without_torch_distributed():
    group = init_tp_group(ParallelConfig(), torch.device("cpu"))
    t = torch.arange(3.0)
    assert group.all_reduce(t) is t and group.all_gather(t, dim=0) is t
    assert group.all_reduce_min(5) == 5
    group.barrier()
    group.destroy()
    assert isinstance(group, TPGroup) and not torch.distributed.is_initialized()
