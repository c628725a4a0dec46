"""Build an engine from configs: executor, `EngineCore` and the tokenizer.

Used by the HTTP server (`cli.py` wraps the core in an `EngineLoop`) and by the
offline `LLM` API, so both run the same model with the same tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.engine.builtin import BUILTIN_NAME
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import KVCacheInfo
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.server.tokenizer import Tokenizer


@dataclass(slots=True)
class BuiltEngine:
    """A ready engine: call `core.step()` (or run it in an `EngineLoop`)."""

    core: EngineCore  # schedule -> execute -> update
    executor: UniExecutor  # owns the model and the KV cache
    tokenizer: Tokenizer  # the model's tokenizer and chat template
    model_dir: Path  # the resolved Hugging Face directory
    kv: KVCacheInfo  # blocks, block size, max_model_len, eos ids

    def shutdown(self) -> None:
        self.core.shutdown()


def build_engine(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    chat_template: str | None = None,
) -> BuiltEngine:
    """Load the model (slow: weights, KV cache) and wire the core and the tokenizer.

    `chat_template` (a Jinja string or a file path) overrides the model's template.
    """
    executor = UniExecutor(engine_config)
    try:
        model_dir = Path(executor.model_dir)
        tokenizer = Tokenizer.from_dir(model_dir, chat_template)
        core = EngineCore(scheduler_config, executor)
    except BaseException:
        executor.shutdown()
        raise
    return BuiltEngine(core, executor, tokenizer, model_dir, core.kv)


def default_model_name(engine_config: EngineConfig) -> str:
    """What the server calls the model when no --served-model-name is given: the
    built-in's name, or MODEL as given on the command line (as vLLM does)."""
    return BUILTIN_NAME if engine_config.model is None else engine_config.model
