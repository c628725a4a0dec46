"""A serving process freezes its start-up heap out of the cyclic GC once it is ready."""

from __future__ import annotations

import gc

import pytest

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.server import build


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_heap_freezes_what_lives_and_still_collects_new_cycles(unfrozen):
    kept = _Cycle()
    build.freeze_heap()
    assert gc.get_freeze_count() > 0
    del kept  # frozen: a cycle from before the freeze is never scanned again
    assert gc.collect() == 0
    _Cycle()  # a cycle made while serving is still found
    assert gc.collect() >= 1


@pytest.mark.skipif(
    not (BUILTIN_TARGET / "model.safetensors").exists(), reason="built-in model not trained"
)
def test_engine_process_core_freezes_after_its_warm_up(monkeypatch, unfrozen):
    events: list[str] = []
    warm_up = EngineCore.warm_up
    monkeypatch.setattr(
        EngineCore, "warm_up", lambda core: events.append("warm_up") or warm_up(core)
    )
    monkeypatch.setattr(build, "freeze_heap", lambda: events.append("freeze"))
    core = build.build_core(EngineConfig(num_threads=1), SchedulerConfig())
    try:
        assert events == ["warm_up", "freeze"]
    finally:
        core.shutdown()
