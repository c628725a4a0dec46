"""Executors run steps. `UniExecutor` runs one worker in this process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tandem.engine.config import EngineConfig
from tandem.engine.plan import KVCacheInfo, StepPlan, StepResult
from tandem.engine.spec_config import SpeculativeConfig
from tandem.engine.worker import Worker

if TYPE_CHECKING:
    from tandem.engine.ray_executor import RayExecutor


class UniExecutor:
    """The in-process executor: one worker, one device, no IPC. `spec` loads a draft
    model when its method is "draft" (n-gram drafts come in the plans)."""

    def __init__(self, config: EngineConfig, spec: SpeculativeConfig | None = None) -> None:
        self.config = config
        self.spec = spec
        self.worker = Worker(config, spec)

    @property
    def model_dir(self) -> Path:
        """The resolved Hugging Face directory (tokenizer and chat template live here)."""
        return Path(self.worker.model_dir)

    def kv_cache_info(self) -> KVCacheInfo:
        return self.worker.kv_cache_info()

    def execute(self, plan: StepPlan) -> StepResult:
        return self.worker.execute(plan)

    def shutdown(self) -> None:
        self.worker.seqs.clear()


def make_executor(
    config: EngineConfig, spec: SpeculativeConfig | None = None
) -> UniExecutor | RayExecutor:
    """The executor `config` asks for: `RayExecutor` (tensor parallelism over Ray actors,
    the default when tensor_parallel_size > 1) or `UniExecutor` (this process)."""
    if config.executor_backend == "ray":
        from tandem.engine.ray_executor import RayExecutor  # imports ray: only when asked

        return RayExecutor(config, spec)
    return UniExecutor(config, spec)
