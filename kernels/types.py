"""Data shared by every attention backend: the per-step metadata and the backend protocol.

A step is one flattened varlen batch of T query tokens from S sequences. Each sequence
contributes a *run* of query tokens at known positions over its paged KV cache: a
prefill chunk (with or without earlier context), one decode token, or a k+1 token
verify window. All are the same thing to a backend.

Worked example, block_size 4: seq 0 decodes 1 token at position 9 (blocks [3, 5, 6]),
seq 1 prefills 3 tokens at positions 0..2 (blocks [2]):

    query_start_loc = [0, 1, 4]        seq_lens = [10, 3]
    block_tables    = [[3, 5, 6], [2, 0, 0]]  (padded)
    slot_mapping    = [6*4+1, 2*4+0, 2*4+1, 2*4+2]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class AttnBucket:
    """Sequences attended by one padded attention call (built once per step).

    The torch backend splits a step in two buckets: single-token decodes (Qb = 1, no
    causal mask inside the run) and longer runs (prefill chunks, verify windows), so
    decodes are never padded up to a long chunk. Within a bucket, sequence b's KV is
    gathered block by block into a padded (Sb, Lb) key range, Lb = max_blocks * block_size.
    """

    num_seqs: int  # Sb
    query_len: int  # Qb: longest run in the bucket (1 for the decode bucket)
    kv_len: int  # Lb: padded keys per sequence, a multiple of block_size
    token_indices: torch.Tensor | None  # (Tb,) int64 rows of the flat batch in this bucket,
    # seq order; None when the bucket is the whole batch in order
    query_indices: torch.Tensor | None  # (Sb*Qb,) int64 flat-batch row for each padded
    # query slot (pad slots repeat a real row); None when no run is padded
    output_indices: torch.Tensor | None  # (Tb,) int64 padded slot of each bucket token;
    # None when no run is padded
    block_indices: torch.Tensor  # (Sb*MB,) int64 KV block ids to gather (pads: block 0)
    mask: torch.Tensor  # (Sb, 1, Qb, Lb) bool, True = query may attend to key
    kv_rows: torch.Tensor | None = None  # backend-specific gather rows, set by prepare


@dataclass(slots=True)
class AttnMetadata:
    """One flattened varlen batch of S sequences and T query tokens."""

    query_start_loc: torch.Tensor  # (S+1,) int32 cumulative query lengths
    seq_lens: torch.Tensor  # (S,) int32 context length after this step (start_pos + run)
    block_tables: torch.Tensor  # (S, max_blocks) int32 KV block ids, padded with 0
    slot_mapping: torch.Tensor  # (T,) int64 cache slot (block_id * block_size + offset)
    max_query_len: int  # longest run this step
    max_seq_len: int  # longest context this step
    num_tokens: int  # T
    decode: AttnBucket | None  # the single-token runs, if any
    runs: AttnBucket | None  # the runs of two or more tokens, if any
    kv_write_rows: torch.Tensor | None = None  # backend-specific write rows, set by prepare
    workspace: torch.Tensor | None = None  # scratch shared by all layers, set by prepare
    backend_data: object | None = None  # other per-step data of one backend, set by prepare


class AttentionBackend(Protocol):
    """One way to write and read the paged KV cache. Stateless; see kernels.registry."""

    name: str
    ops_module: str  # module with the model's other ops (rms_norm, rms_norm_residual,
    # rotate_neox, silu_and_mul; see torch_ref) for this backend's devices
    supports_cuda_graphs: bool  # write_kv/prepare/paged_attention are capturable: no host
    # syncs, shapes from host ints only, pad tokens with slot -1 are skipped
    uses_buckets: bool  # reads AttnMetadata.decode / .runs (the gathered-KV buckets);
    # when False the engine leaves them None and skips building and copying them
    rotate_and_write_kv: Callable[..., torch.Tensor] | None  # None, or one kernel for
    # rotary + write_kv: (qkv (T, Hq + 2 Hkv, D) view, Hq, cos, sin, kv_cache, meta) ->
    # rotated q (T, Hq, D), the rotated k and v stored at meta.slot_mapping

    @classmethod
    def unavailable_reasons(
        cls, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
    ) -> list[str]:
        """Why this backend cannot run here; empty when it can."""
        ...

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor."""
        ...

    @staticmethod
    def prepare(meta: AttnMetadata, kv_cache: torch.Tensor) -> AttnMetadata:
        """Once per step, before the first layer: meta plus the backend's per-step helpers
        (index tensors for this cache's layout, scratch), shared by every layer."""
        ...

    @staticmethod
    def write_kv(
        k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata
    ) -> None:
        """Store this step's k, v (T, Hkv, D) at meta.slot_mapping of one layer's cache."""
        ...

    @staticmethod
    def paged_attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float
    ) -> torch.Tensor:
        """q (T, Hq, D) over the cache (KV of this step already written) -> (T, Hq, D)."""
        ...
