"""CUDA graphs for uniform steps: B sequences that each run q query tokens (q = 1 for
decodes, k+1 for speculative verify windows), replayed with one launch instead of a few
hundred kernel launches.

Graphs are captured lazily, once per (batch bucket, q): a step of S sequences runs the
graph of the smallest bucket B >= S, its inputs copied into static buffers and padded
with B - S dummy sequences of q tokens at position 0 whose KV slots are -1 (the
backend's write skips them) and whose block table row is block 0 (read, never
written). The captured metadata says max_seq_len = max_model_len, so a backend plans
its tiles (e.g. split-K) for the longest context; the real lengths come from the
buffers. Replay adds no host sync: every copy is device to device.

Mixed steps (prefill chunks, unequal windows) and batches past the largest bucket run
eagerly, as does everything when the backend is not capturable or enforce_eager is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.engine.model_input import ModelInput
from tandem.kernels.types import AttentionBackend, AttnMetadata

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MAX_QUERY_LEN = 8  # verify windows up to k = 7 are captured; longer runs are eager


def cuda_graph_refusals(
    enforce_eager: bool, device: torch.device, backend: AttentionBackend
) -> list[str]:
    """Why steps cannot be replayed from CUDA graphs here ([] = they can)."""
    reasons = []
    if enforce_eager:
        reasons.append("enforce_eager is set")
    if device.type != "cuda":
        reasons.append(f"device {device} is not CUDA")
    if not backend.supports_cuda_graphs:
        reasons.append(f"attention backend {backend.name} is not capturable")
    return reasons


@dataclass(slots=True)
class CapturedStep:
    """One captured forward and the tensor its replays overwrite."""

    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # (B*q, H) final hidden states of the last replay


class CudaGraphRunner:
    """Replays a model's forward for uniform steps from CUDA graphs.

    model(input_ids (T,), positions (T,), kv_caches, meta) -> hidden (T, H) must be
    capturable for meta with decode = runs = None (see AttentionBackend
    .supports_cuda_graphs).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        kv_caches: list[torch.Tensor],
        *,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        batch_sizes: tuple[int, ...] = BATCH_SIZES,
        max_query_len: int = MAX_QUERY_LEN,
    ) -> None:
        if not batch_sizes or sorted(batch_sizes) != list(batch_sizes) or batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be increasing and positive, got {batch_sizes}")
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.batch_sizes = batch_sizes
        self.max_query_len = max_query_len
        max_seqs, max_tokens = batch_sizes[-1], batch_sizes[-1] * max_query_len
        max_blocks = -(-max_model_len // block_size)
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_tokens, **i64)
        self.positions = torch.zeros(max_tokens, **i64)
        self.slot_mapping = torch.full((max_tokens,), -1, **i64)
        self.seq_lens = torch.ones(max_seqs, **i32)
        self.block_tables = torch.zeros(max_seqs, max_blocks, **i32)
        self.query_start_loc = {  # q -> (max_seqs+1,) arange * q: constant per q
            q: torch.arange(0, (max_seqs + 1) * q, q, **i32) for q in range(1, max_query_len + 1)
        }
        self.graphs: dict[tuple[int, int], CapturedStep] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def key_for(self, inp: ModelInput) -> tuple[int, int] | None:
        """(bucket B, q) when inp is S <= B sequences of q tokens each, else None."""
        meta = inp.attn_meta
        num_seqs, q = meta.seq_lens.shape[0], meta.max_query_len
        if q > self.max_query_len or meta.num_tokens != num_seqs * q:
            return None
        if meta.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        bucket = next((b for b in self.batch_sizes if b >= num_seqs), None)
        return None if bucket is None else (bucket, q)

    def run(self, inp: ModelInput, key: tuple[int, int]) -> torch.Tensor:
        """Hidden states (T, H) of inp's tokens; captures key's graph on first use.

        The result is a view of the graph's output: use it before the next run."""
        if key not in self.graphs:
            self.capture(*key)
        self.stage(inp, key)
        step = self.graphs[key]
        step.graph.replay()
        return step.hidden[: inp.attn_meta.num_tokens]

    def stage(self, inp: ModelInput, key: tuple[int, int]) -> tuple:
        """Copy inp into the static buffers, pad it to key, and return the forward's
        arguments over those buffers (the ones key's graph was captured with)."""
        meta = inp.attn_meta
        num_seqs, num_tokens = meta.seq_lens.shape[0], meta.num_tokens
        self.input_ids[:num_tokens].copy_(inp.input_ids)
        self.positions[:num_tokens].copy_(inp.positions)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        self.block_tables[:num_seqs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self._pad(num_seqs, *key)
        return self._args(*key)

    def capture(self, bucket: int, q: int) -> None:
        """Capture the forward of `bucket` sequences of q tokens (after one eager warmup
        run, which compiles kernels; every sequence is padding, so no KV is written)."""
        t0 = time.perf_counter()
        self._pad(0, bucket, q)
        args = self._args(bucket, q)
        self.model(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(*args)
        self.graphs[(bucket, q)] = CapturedStep(graph, hidden)
        logger.info(
            "captured CUDA graph for %d seqs x %d tokens in %.2fs",
            bucket,
            q,
            time.perf_counter() - t0,
        )

    def _pad(self, num_seqs: int, bucket: int, q: int) -> None:
        """Make sequences num_seqs..bucket-1 dummies of q tokens that write nothing."""
        if num_seqs == bucket:
            return
        first, end = num_seqs * q, bucket * q
        self.input_ids[first:end].zero_()
        self.positions[first:end].zero_()
        self.slot_mapping[first:end].fill_(-1)
        self.seq_lens[num_seqs:bucket].fill_(q)
        self.block_tables[num_seqs:bucket].zero_()

    def _args(self, bucket: int, q: int) -> tuple:
        """(input_ids, positions, kv_caches, meta) over the static buffers; the metadata
        has flat fields only (no torch-backend buckets) and max_seq_len = max_model_len."""
        num_tokens = bucket * q
        meta = AttnMetadata(
            query_start_loc=self.query_start_loc[q][: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:num_tokens],
            max_query_len=q,
            max_seq_len=self.max_model_len,
            num_tokens=num_tokens,
            decode=None,
            runs=None,
        )
        return self.input_ids[:num_tokens], self.positions[:num_tokens], self.kv_caches, meta
