"""The model runner: one model, its paged KV cache, and a forward per step.

runner = ModelRunner(EngineConfig(model="path/to/hf-dir"))
inp = runner.build_input([RunSeq(prompt_ids, 0, block_ids, len(prompt_ids) - 1)])
logits = runner.execute(inp)  # (1, V) float32: the next-token logits
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.cuda_graphs import CudaGraphRunner, cuda_graph_refusals
from tandem.engine.kv_cache import KVCacheSpec, allocate_kv_caches, num_blocks_for
from tandem.engine.model_input import ModelInput, RunSeq, build_model_input
from tandem.engine.models.layers import TPInfo
from tandem.engine.models.loader import (
    checkpoint_dtype,
    eos_token_ids,
    load_hf_config,
    load_weights,
    resolve_model_dir,
)
from tandem.engine.models.registry import ModelLoadError, resolve_model_class
from tandem.engine.parallel import TPGroup
from tandem.engine.platform import detect_platform, resolve_dtype
from tandem.kernels.registry import get_attention_backend

logger = logging.getLogger(__name__)


def resolve_max_model_len(requested: int | None, hf_config) -> int:
    """requested, or the model's max_position_embeddings; never more than the latter."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is None:
        if requested is None:
            raise ModelLoadError("config.json has no max_position_embeddings; set max_model_len")
        return requested
    if requested is not None and requested > limit:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's max_position_embeddings={limit}"
        )
    return requested or limit


class ModelRunner:
    """Loads the model and KV cache for an EngineConfig; `execute` runs one step.

    num_blocks: KV blocks to allocate; default: as many as config.kv_cache_memory holds
    (a draft model passes the target's count, so both index the same block ids).
    tp: this rank's tensor-parallel group (default: a single rank). With tp, the model is
    sharded, config.kv_cache_memory is per rank and holds this rank's KV heads, and the
    default num_blocks is the minimum over ranks (identical on every rank)."""

    def __init__(
        self, config: EngineConfig, num_blocks: int | None = None, tp: TPGroup | None = None
    ) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.tp = tp or TPGroup(0, 1, None)
        platform = detect_platform(config.device)
        self.device = platform.device
        if config.num_threads is not None and platform.kind == "cpu":
            torch.set_num_threads(config.num_threads)
        self.model_dir: Path = resolve_model_dir(config.model)
        self.hf_config = load_hf_config(self.model_dir)
        self.dtype = resolve_dtype(config.dtype, platform, checkpoint_dtype(self.hf_config))
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.hf_config)
        self.block_size = config.block_size
        self.eos_token_ids = eos_token_ids(self.model_dir, self.hf_config)
        self.model = self._build_model()
        spec = KVCacheSpec(
            num_layers=self.model.num_layers,
            num_kv_heads=self.model.num_kv_heads,
            head_dim=self.model.head_dim,
            dtype=self.dtype,
            block_size=self.block_size,
        )
        if num_blocks is None:
            local = num_blocks_for(config.kv_cache_bytes, spec, self.max_model_len)
            num_blocks = self.tp.all_reduce_min(local)
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(spec, self.num_blocks, self.backend, self.device)
        self.graphs = self._cuda_graphs()
        logger.info(
            "loaded %s (%s, %s) on %s in %.1fs: %d KV blocks of %d tokens",
            self.model_dir,
            type(self.model).__name__,
            self.dtype,
            self.device,
            time.perf_counter() - t0,
            self.num_blocks,
            self.block_size,
        )

    def _build_model(self) -> torch.nn.Module:
        model_cls = resolve_model_class(self.hf_config)
        c = self.hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.backend = get_attention_backend(
            self.config.attention_backend, self.device, self.dtype, head_dim, self.block_size
        )
        model = model_cls(
            c,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            backend=self.backend,
            tp=TPInfo.of(self.tp),
        )
        load_weights(model, self.model_dir)
        return model.eval()

    def _cuda_graphs(self) -> CudaGraphRunner | None:
        """The graph runner for uniform decode/verify steps, or None (logged why)."""
        refusals = cuda_graph_refusals(self.config.enforce_eager, self.device, self.backend)
        if self.tp.world_size > 1:
            # c10d collectives are not registered for graph capture here (a captured
            # all-reduce would need a graph-safe communicator, e.g. pynccl); run eagerly.
            refusals.append(f"tensor parallel (size {self.tp.world_size}) runs eagerly")
        if refusals:
            logger.info("CUDA graphs off: %s", "; ".join(refusals))
            return None
        return CudaGraphRunner(
            self.model,
            self.kv_caches,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            device=self.device,
        )

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def build_input(self, seqs: list[RunSeq], non_blocking: bool = False) -> ModelInput:
        """`seqs` flattened into one step's inputs on this runner's device, with the
        metadata its attention backend reads (see build_model_input)."""
        return build_model_input(
            seqs,
            self.block_size,
            self.device,
            buckets=self.backend.uses_buckets,
            non_blocking=non_blocking,
        )

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> torch.Tensor:
        """One forward over the step's T tokens -> (L, V) float32 logits for the rows
        inp.logits_indices (in that order; L may be 0). Writes the step's K/V."""
        key = None if self.graphs is None else self.graphs.key_for(inp)
        if key is None:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.attn_meta)
        else:  # uniform decode / verify step: replay its CUDA graph
            hidden = self.graphs.run(inp, key)
        if inp.logits_indices.numel() != hidden.shape[0]:
            hidden = hidden.index_select(0, inp.logits_indices)
        return self.model.compute_logits(hidden)
