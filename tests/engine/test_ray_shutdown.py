"""A RayExecutor that starts its own local Ray cluster stops it on shutdown: every
process that cluster started (GCS, raylet, agents, the rank actors) is gone after."""

from __future__ import annotations

import functools
import time

import pytest

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan

ray = pytest.importorskip("ray")
import psutil  # noqa: E402  (Ray ships it: importable once ray is imported)

from tandem.engine.ray_executor import RayExecutor  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (BUILTIN_TARGET / "model.safetensors").exists(), reason="built-in model not trained"
)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_stops_the_actors_and_the_local_cluster_it_started():
    if ray.is_initialized():
        ray.shutdown()  # another module's cluster: this test needs the executor's own
    config = EngineConfig(
        dtype="float32", kv_cache_memory=8 << 20, max_model_len=128, tensor_parallel_size=2
    )
    executor = RayExecutor(config)
    try:
        assert executor.started_ray and ray.is_initialized()
        started = psutil.Process().children(recursive=True)
        names = " ".join(p.name() for p in started)
        assert "raylet" in names and "gcs_server" in names, names
        ranks = [psutil.Process(pid) for pid in executor.rank_pids]
        assert all(r in started for r in ranks)
        seq = SeqPlan(1, [5, 6, 7], 0, [0], True, NewSeq(SamplingParams(temperature=0.0), 3))
        assert len(executor.execute(StepPlan(0, [seq])).seqs[0].token_ids) == 1
    finally:
        executor.shutdown()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 15
    while left := [p for p in started if _alive(p)]:
        assert time.monotonic() < deadline, [(p.pid, p.name()) for p in left]
        time.sleep(0.1)
    executor.shutdown()  # twice is harmless


def test_a_killed_engine_process_takes_its_ray_cluster_with_it():
    """The server SIGKILLs an engine process that does not stop in time (here: at once);
    the Ray cluster that process started must not outlive it."""
    from tandem.scheduler.config import SchedulerConfig
    from tandem.scheduler.process_loop import ProcessEngineLoop
    from tandem.server.build import build_core

    config = EngineConfig(
        dtype="float32", kv_cache_memory=8 << 20, max_model_len=128, tensor_parallel_size=2
    )
    loop = ProcessEngineLoop(functools.partial(build_core, config, SchedulerConfig()))
    loop.launch(timeout=120)
    assert loop.pid is not None
    started = psutil.Process(loop.pid).children(recursive=True)
    assert "raylet" in " ".join(p.name() for p in started)
    assert not loop.shutdown(timeout=0.0)  # no time to stop: SIGKILL
    deadline = time.monotonic() + 15
    while left := [p for p in started if _alive(p)]:
        assert time.monotonic() < deadline, [(p.pid, p.name()) for p in left]
        time.sleep(0.1)
