"""Build an engine from configs: executor, `EngineCore` and the tokenizer.

    build_engine(...)           the core in this process (offline `LLM`, the thread loop)
    launch_engine_process(...)  the core in a child process behind a ProcessEngineLoop;
                                the tokenizer here, in the server process

Both run the same model with the same tokenization. `build_core` is the child's
factory: a module-level function, so `functools.partial(build_core, ...)` pickles.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.engine.builtin import BUILTIN_NAME
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor, make_executor
from tandem.engine.models.loader import resolve_model_dir
from tandem.engine.plan import KVCacheInfo
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.process_loop import ProcessEngineLoop
from tandem.server.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tandem.engine.ray_executor import RayExecutor

STATS_HISTORY = 256  # recent steps kept for metrics (EngineCore's default)


@dataclass(slots=True)
class BuiltEngine:
    """A ready engine: call `core.step()` (or run it in an `EngineLoop`)."""

    core: EngineCore  # schedule -> execute -> update
    executor: UniExecutor | RayExecutor  # owns the model (or its TP ranks) and the KV cache
    tokenizer: Tokenizer  # the model's tokenizer and chat template
    model_dir: Path  # the resolved Hugging Face directory
    kv: KVCacheInfo  # blocks, block size, max_model_len, eos ids

    def shutdown(self) -> None:
        self.core.shutdown()


@dataclass(slots=True)
class LaunchedEngine:
    """An engine process, launched and ready: start `loop` on the server's event loop."""

    loop: ProcessEngineLoop  # the core runs in its child process
    tokenizer: Tokenizer  # loaded in this process from model_dir
    model_dir: Path  # the resolved Hugging Face directory
    kv: KVCacheInfo  # as the child reported it


def build_engine(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    chat_template: str | None = None,
    stats_history: int = STATS_HISTORY,
    spec: SpeculativeConfig | None = None,
) -> BuiltEngine:
    """Load the model (slow: weights, KV cache), wire the core and the tokenizer, and
    warm the core up (`EngineCore.warm_up`).

    `chat_template` (a Jinja string or a file path) overrides the model's template;
    `stats_history`: recent steps the core keeps for metrics.
    """
    executor = make_executor(engine_config, spec)
    try:
        model_dir = Path(executor.model_dir)
        tokenizer = Tokenizer.from_dir(model_dir, chat_template)
        core = EngineCore(scheduler_config, executor, stats_history=stats_history, spec=spec)
        core.warm_up()
    except BaseException:
        executor.shutdown()
        raise
    return BuiltEngine(core, executor, tokenizer, model_dir, core.kv)


def build_core(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    spec: SpeculativeConfig | None = None,
) -> EngineCore:
    """The executor and the core (warmed up), no tokenizer: what the engine process
    builds. (Its stats history stays short: the parent keeps the steps it is sent.)"""
    executor = make_executor(engine_config, spec)
    try:
        core = EngineCore(scheduler_config, executor, spec=spec)
        core.warm_up()
    except BaseException:
        executor.shutdown()
        raise
    freeze_heap()  # this process serves from here on
    return core


def freeze_heap() -> None:
    """Take everything alive now out of the cyclic garbage collector's scans
    (`gc.freeze`), once a serving process is ready.

    Such a process holds a large start-up heap (torch, transformers, the models'
    modules, the tokenizer), and a full collection walks all of it while every request
    waits. Measured on the built-in pair with its draft model (2-core CPU, 64 requests
    in a closed loop): one full collection took 228 ms, 5% of the run; with the heap
    frozen the run's full collections took 0.3 ms each. What a step allocates is
    short-lived and still collected. Frozen objects are freed as before when their
    reference count drops; only a cycle among them would stay."""
    gc.collect()
    gc.freeze()


def launch_engine_process(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    chat_template: str | None = None,
    stats_history: int = STATS_HISTORY,
    spec: SpeculativeConfig | None = None,
    timeout: float | None = None,
    log_setup: Callable[[], None] | None = None,
) -> LaunchedEngine:
    """Resolve the model here (a hub id is downloaded once, by this process), load the
    tokenizer, then spawn the engine process and wait until its core is built.

    Raises ModelLoadError (no such model) or EngineStartError (the child's error, one
    line), leaving nothing running. `stats_history`: recent steps kept for metrics;
    `log_setup`: configures logging in the child (picklable; see ProcessEngineLoop).
    """
    model_dir = resolve_model_dir(engine_config.model)
    tokenizer = Tokenizer.from_dir(model_dir, chat_template)
    child_config = engine_config
    if engine_config.model is not None:  # the child loads the resolved directory
        child_config = dataclasses.replace(engine_config, model=str(model_dir))
    factory = functools.partial(build_core, child_config, scheduler_config, spec)
    loop = ProcessEngineLoop(factory, stats_history, log_setup)
    loop.launch(timeout)
    return LaunchedEngine(loop, tokenizer, model_dir, loop.kv)


def default_model_name(engine_config: EngineConfig) -> str:
    """What the server calls the model when no --served-model-name is given: the
    built-in's name, or MODEL as given on the command line (as vLLM does)."""
    return BUILTIN_NAME if engine_config.model is None else engine_config.model
