"""Tensor-parallel process group: the one place that talks to torch.distributed.

Interface for the executor (Ray TP workers) and the model layers:

    pc = ParallelConfig(world_size=2, rank=r, init_method="tcp://127.0.0.1:29513")
    worker = Worker(config, spec, parallel=pc)   # calls init_tp_group(pc, device) itself

Every rank builds the same Worker from the same EngineConfig; the Worker shards the
target model (column/row-parallel linears, vocab-parallel embedding and LM head), loads
only its slices of the safetensors weights, and sizes its KV cache for its local KV
heads. `Worker.num_blocks` is identical on every rank (it is derived from the full-model
per-block cost, then agreed on with a MIN all-reduce), so the executor may assert it.
The LM head output is all-gathered, so every rank computes the same full-vocab logits
and samples the same tokens: the executor returns rank 0's StepResult. The draft model
(speculation) is replicated unsharded on every rank and adds no communication.

A collective that does not finish within `timeout_s` raises (gloo: RuntimeError) or
aborts the process (nccl, via the process-group watchdog); nothing waits forever.
`worker.tp_group.destroy()` tears the group down; call it before a worker process exits
(Worker destroys it itself when its model fails to load). CUDA graphs are off when
world_size > 1 (logged): the c10d collectives are not captured into graphs here.
`kv_cache_memory` is per rank and holds that rank's KV heads (Hkv/tp, or 1 replicated
head when Hkv < tp), so TP=2 doubles the block count of a model with Hkv >= 2.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.engine.platform import DIST_BACKENDS


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How one engine process takes part in tensor parallelism."""

    world_size: int = 1  # tensor-parallel ranks; 1 = no parallelism, no torch.distributed
    rank: int = 0  # this process's rank, 0 <= rank < world_size
    init_method: str | None = None  # rendezvous, e.g. "tcp://127.0.0.1:29513"; required if >1
    backend: str | None = None  # None: from the device (gloo cpu, nccl cuda, hccl npu)
    timeout_s: float = 60.0  # a collective that takes longer fails instead of hanging

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}); got {self.rank}")
        if self.world_size > 1 and not self.init_method:
            raise ValueError("init_method (e.g. tcp://127.0.0.1:29513) is required for TP > 1")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0; got {self.timeout_s}")


class TPGroup:
    """The tensor-parallel group of one rank. With world_size 1 every method is a no-op
    (all_reduce/all_gather return their input) and torch.distributed is never touched."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None,
        device: torch.device | None = None,
    ) -> None:
        self.rank = rank  # this process's rank
        self.world_size = world_size  # number of ranks
        self._group = group  # None when world_size == 1
        self._device = device or torch.device("cpu")  # where the backend's tensors live

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place; returns `t` (any shape, same on every rank)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._group)
        return t

    def all_reduce_min(self, value: int) -> int:
        """The minimum of an integer over ranks (e.g. agreeing on num_blocks)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._group)
        return int(t.item())

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim` in rank order.

        Shapes: t (..., n, ...) on each rank, same shape everywhere -> (..., n * W, ...).
        """
        if self.world_size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self._group)
        return torch.cat(parts, dim=dim)

    def barrier(self) -> None:
        """Wait until every rank reaches this point (bounded by the group timeout)."""
        if self.world_size > 1:
            if self._device.type == "cuda":
                dist.barrier(group=self._group, device_ids=[self._device.index or 0])
            else:
                dist.barrier(group=self._group)

    def destroy(self) -> None:
        """Tear down the process group; safe to call twice."""
        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group()
        self._group = None
        self.world_size = 1


def init_tp_group(pc: ParallelConfig, device: torch.device) -> TPGroup:
    """Join the tensor-parallel group described by `pc` on `device`.

    world_size 1: a no-op group. Otherwise initialises the default torch.distributed
    process group (blocking until all ranks joined, at most `pc.timeout_s`).
    """
    if pc.world_size == 1:
        return TPGroup(0, 1, None)
    backend = pc.backend or DIST_BACKENDS[device.type]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=pc.init_method,
        rank=pc.rank,
        world_size=pc.world_size,
        timeout=datetime.timedelta(seconds=pc.timeout_s),
    )
    comm_device = torch.device("cpu") if backend == "gloo" else device
    return TPGroup(pc.rank, pc.world_size, dist.group.WORLD, comm_device)
