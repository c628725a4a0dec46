"""Paged KV-cache tensors: how many blocks fit a memory budget, and their allocation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.kernels.types import AttentionBackend


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """What one block of KV cache holds, across all layers of one model (one TP rank)."""

    num_layers: int
    num_kv_heads: int  # per rank
    head_dim: int
    dtype: torch.dtype
    block_size: int  # tokens per block

    @property
    def bytes_per_block(self) -> int:
        """K and V of block_size tokens in every layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem
        return per_token * self.block_size


def num_blocks_for(memory_bytes: int, spec: KVCacheSpec, max_model_len: int) -> int:
    """Blocks that fit in memory_bytes (one rank's budget, for its spec). Raises
    ValueError when they cannot hold one sequence of max_model_len tokens (so a maximal
    request can always run)."""
    num_blocks = memory_bytes // spec.bytes_per_block
    needed = -(-max_model_len // spec.block_size)
    if num_blocks < max(needed, 1):
        raise ValueError(
            f"kv_cache_memory={memory_bytes} bytes holds {num_blocks} blocks of "
            f"{spec.block_size} tokens ({spec.bytes_per_block} bytes each), fewer than the "
            f"{needed} one sequence of max_model_len={max_model_len} needs "
            f"({needed * spec.bytes_per_block} bytes): raise kv_cache_memory or lower max_model_len"
        )
    return num_blocks


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, backend: AttentionBackend, device: torch.device
) -> list[torch.Tensor]:
    """One zeroed tensor per layer, shaped by the backend (see its kv_cache_shape)."""
    shape = backend.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
