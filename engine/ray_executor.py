"""`RayExecutor`: tensor parallelism over Ray actors, one per rank.

    ex = RayExecutor(EngineConfig(tensor_parallel_size=2), spec)
    ex.kv_cache_info()        # every rank agrees (asserted at start)
    ex.execute(plan)          # plan -> all ranks (compiled graph), rank 0's StepResult
    ex.shutdown()             # actors, placement group, and the local cluster if ours

Without `config.ray_address` a local Ray cluster is started (num_cpus = max(TP, 2), no
dashboard) and stopped again by `shutdown()`; with it ("auto" or HOST:PORT) an existing
cluster is joined and left running. A process already connected to Ray (a test, a
benchmark) keeps its connection: the executor uses it and leaves it open. Ranks are placed with a PACK placement group of one
bundle per rank: {"GPU": 1} on CUDA, {"NPU": 1} (a custom resource) on NPU, {"CPU": 1}
otherwise; the device kind is `config.device`, or for "auto" the cluster's resources.

Failure: a rank that raises, dies, or does not answer within `config.step_timeout_s`
makes `execute` raise `ExecutorDeadError` (and every later call too): the serving loop
then fails every in-flight request. Collectives fail after min(step timeout, 60 s).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.plan import KVCacheInfo, StepPlan, StepResult
from tandem.engine.ray_worker import RankWorker, StepBroadcast
from tandem.engine.spec_config import SpeculativeConfig

logger = logging.getLogger(__name__)
INIT_TIMEOUT_S = 900.0  # building the ranks (model load) may take this long at most
PLACEMENT_TIMEOUT_S = 60.0  # the cluster must find every rank its bundle by then
COLLECTIVE_TIMEOUT_S = 60.0  # a collective fails after this (or the step timeout)
BUNDLE_KINDS = ("GPU", "NPU", "CPU")  # resources a rank's bundle may ask for


class ExecutorDeadError(RuntimeError):
    """A tensor-parallel rank failed, died or timed out; the executor is unusable."""


class RayExecutor:
    """Runs each step on `config.tensor_parallel_size` Ray actors (see the module doc)."""

    def __init__(self, config: EngineConfig, spec: SpeculativeConfig | None = None) -> None:
        import ray

        self.config = config
        self.spec = spec
        self.world_size = config.tensor_parallel_size
        self.started_ray = False  # this executor called ray.init, so shutdown() calls
        # ray.shutdown(): that stops a local cluster it started, leaves a joined one up
        self.actors: list[Any] = []  # RankWorker actor handles, by rank
        self.rank_pids: list[int] = []  # each rank's process id (on its node), by rank
        self.placement_group: Any = None
        self.broadcast: StepBroadcast | None = None
        self.error: str | None = None  # why the executor is dead, once it is
        if not ray.is_initialized():
            self._init_ray()
        try:
            self._start_ranks()
        except BaseException:
            self.shutdown()
            raise

    # ---- start ---------------------------------------------------------------------

    def _init_ray(self) -> None:
        import ray

        quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.config.ray_address is None:
            ray.init(num_cpus=max(self.world_size, 2), **quiet)
        else:
            ray.init(address=self.config.ray_address, **quiet)
        self.started_ray = True

    def _start_ranks(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        kind = self._bundle_kind()
        pg = placement_group([{kind: 1}] * self.world_size, strategy="PACK")
        self.placement_group = pg
        if not pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            raise RuntimeError(
                f"Ray could not place {self.world_size} ranks with one {kind} each within "
                f"{PLACEMENT_TIMEOUT_S:g} s (available: {ray.available_resources()})"
            )
        actor_cls = ray.remote(RankWorker)
        timeout = min(self.config.step_timeout_s, COLLECTIVE_TIMEOUT_S)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            actor = actor_cls.options(
                scheduling_strategy=strategy,
                name=f"tandem-rank{rank}-{id(self):x}",
                **_resources(kind),
            ).remote(self.config, self.spec, rank, self.world_size, timeout)
            self.actors.append(actor)
        self.rank_pids = ray.get([a.pid.remote() for a in self.actors], timeout=INIT_TIMEOUT_S)
        address = ray.get(self.actors[0].rendezvous_address.remote(), timeout=INIT_TIMEOUT_S)
        infos = ray.get(
            [a.init_worker.remote(address) for a in self.actors], timeout=INIT_TIMEOUT_S
        )
        if any(info != infos[0] for info in infos):
            raise RuntimeError(f"tensor-parallel ranks disagree on the KV cache: {infos}")
        self._kv = infos[0]
        self._model_dir = Path(ray.get(self.actors[0].model_dir.remote()))
        self.broadcast = StepBroadcast(self.actors)

    def _bundle_kind(self) -> str:
        """The resource a rank needs: from config.device, or the cluster's for auto."""
        import ray

        kind = self.config.device.partition(":")[0]
        if kind != "auto":
            return {"cuda": "GPU", "npu": "NPU"}.get(kind, "CPU")
        resources = ray.cluster_resources()
        return next(k for k in BUNDLE_KINDS if resources.get(k, 0) >= 1 or k == "CPU")

    # ---- the Executor protocol ----------------------------------------------------

    @property
    def model_dir(self) -> Path:
        """The resolved Hugging Face directory (tokenizer and chat template live here)."""
        return self._model_dir

    def kv_cache_info(self) -> KVCacheInfo:
        return self._kv

    def execute(self, plan: StepPlan) -> StepResult:
        """Rank 0's result. Raises ExecutorDeadError when a rank fails, dies or times out."""
        if self.error is not None or self.broadcast is None:
            raise ExecutorDeadError(self.error or "the executor was shut down")
        t0 = time.monotonic()
        try:
            return self.broadcast.execute(plan, self.config.step_timeout_s)
        except Exception as exc:
            self.error = _describe(exc, time.monotonic() - t0, self.config.step_timeout_s)
            logger.error("tensor-parallel step %d failed: %s", plan.step_id, self.error)
            raise ExecutorDeadError(self.error) from exc

    def shutdown(self) -> None:
        """Stop every actor, remove the placement group, stop the cluster if ours.
        Safe to call twice, and after a rank died."""
        import ray

        if not ray.is_initialized():
            return
        if self.broadcast is not None:
            _quietly(self.broadcast.teardown)
            self.broadcast = None
        if self.error is None:  # leave the process group cleanly where the ranks live
            refs = [a.shutdown.remote() for a in self.actors]
            _quietly(lambda: ray.get(refs, timeout=10))
        for actor in self.actors:
            _quietly(lambda a=actor: ray.kill(a, no_restart=True))
        self.actors = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            _quietly(lambda: remove_placement_group(self.placement_group))
            self.placement_group = None
        if self.started_ray:
            self.started_ray = False
            ray.shutdown()


def _resources(kind: str) -> dict[str, Any]:
    """Actor options that take exactly one bundle of `kind`."""
    if kind == "GPU":
        return {"num_gpus": 1, "num_cpus": 0}
    if kind == "NPU":
        return {"resources": {"NPU": 1}, "num_cpus": 0}
    return {"num_cpus": 1}


def _describe(exc: Exception, elapsed_s: float, timeout_s: float) -> str:
    """One line saying why a step failed."""
    from ray.exceptions import (
        ActorDiedError,
        GetTimeoutError,
        RayChannelError,
        RayChannelTimeoutError,
    )

    if isinstance(exc, (GetTimeoutError, RayChannelTimeoutError, TimeoutError)):
        return f"a tensor-parallel step did not finish within {timeout_s:g} s"
    if isinstance(exc, (ActorDiedError, RayChannelError)):  # a dead rank closes its channel
        return f"a tensor-parallel worker died ({elapsed_s:.1f} s into the step: {exc})"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"a tensor-parallel worker failed: {type(exc).__name__}: {first}"


def _quietly(fn: Any) -> None:
    try:
        fn()
    except Exception as exc:  # shutting down a broken cluster must not hide the cause
        logger.debug("ignored during Ray shutdown: %s", exc)
