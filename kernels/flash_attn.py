"""The flash-attn 2 backend: `flash_attn_varlen_func` with a block table (paged KV).

flash-attn reads K and V pages token-major, (num_blocks, block_size, Hkv, D) each, so
this backend declares the cache (2, NB, BS, Hkv, D) (see kv_cache_shape); new K/V go in
through the layout-agnostic Triton write kernel. flash-attn 2 needs paged blocks of a
multiple of 256 tokens, and fp16/bf16. Its causal mask is aligned bottom-right, which is
exactly a run of n query tokens at the end of its sequence's L keys (token i sees keys
0..L-n+i), so prefill chunks, decodes and verify windows go in one call.

flash_attn is imported only when attention runs, so this module (its layout and
refusals) loads on machines without it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tandem.kernels.types import AttnMetadata

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
PAGE_MULTIPLE = 256  # flash-attn 2: "Paged KV cache block size must be divisible by 256"


def module_installed(name: str) -> bool:
    """True when `name` can be imported (found on the path; not imported here)."""
    return importlib.util.find_spec(name) is not None


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    """(2, num_blocks, block_size, Hkv, D): [0] keys, [1] values, token-major pages."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


@dataclass(slots=True)
class FlashStep:
    """Per-step inputs flash-attn needs beyond AttnMetadata."""

    cu_seqlens_k: torch.Tensor  # (S+1,) int32 cumulative context lengths


def prepare(meta: AttnMetadata, kv_cache: torch.Tensor) -> AttnMetadata:
    """meta with cu_seqlens_k (computed on the device: no host sync)."""
    cu = F.pad(torch.cumsum(meta.seq_lens, 0, dtype=torch.int32), (1, 0))
    return replace(meta, backend_data=FlashStep(cu_seqlens_k=cu))


def varlen_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, step: FlashStep, scale: float
) -> torch.Tensor:
    """The one flash-attn call: q (T, Hq, D) over pages kv_cache[0], [1] -> (T, Hq, D)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q,
        kv_cache[0],
        kv_cache[1],
        cu_seqlens_q=meta.query_start_loc,
        cu_seqlens_k=step.cu_seqlens_k,
        max_seqlen_q=meta.max_query_len,
        max_seqlen_k=meta.max_seq_len,
        softmax_scale=scale,
        causal=True,
        block_table=meta.block_tables,
    )


class FlashAttnBackend:
    """flash-attn 2 over token-major pages; CUDA, fp16/bf16, blocks of 256k tokens."""

    name = "flash_attn"
    ops_module = "tandem.kernels.triton_ops"
    supports_cuda_graphs = True
    uses_buckets = False

    @classmethod
    def unavailable_reasons(
        cls, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
    ) -> list[str]:
        reasons = []
        if device.type != "cuda":
            reasons.append(f"needs a CUDA device, got {device}")
        for module in ("flash_attn", "triton"):
            if not module_installed(module):
                reasons.append(f"{module} is not installed")
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not one of {SUPPORTED_DTYPES}")
        if head_dim % 8 or not 0 < head_dim <= 256:
            reasons.append(f"head_dim must be a multiple of 8 up to 256, got {head_dim}")
        if block_size % PAGE_MULTIPLE:
            reasons.append(
                f"paged KV needs block_size a multiple of {PAGE_MULTIPLE}, got {block_size}"
            )
        return reasons

    kv_cache_shape = staticmethod(kv_cache_shape)
    prepare = staticmethod(prepare)

    @staticmethod
    def write_kv(k, v, kv_cache: torch.Tensor, meta: AttnMetadata) -> None:
        from tandem.kernels import triton_attn

        triton_attn.write_kv(k, v, triton_attn.token_major(kv_cache), meta.slot_mapping)

    @staticmethod
    def rotate_and_write_kv(qkv, num_q_heads, cos, sin, kv_cache, meta) -> torch.Tensor:
        from tandem.kernels import triton_attn
        from tandem.kernels.triton_rope_kv import rotate_and_write_kv

        cache = triton_attn.token_major(kv_cache)
        return rotate_and_write_kv(qkv, num_q_heads, cos, sin, cache, meta.slot_mapping)

    @staticmethod
    def paged_attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float
    ) -> torch.Tensor:
        step = meta.backend_data
        if not isinstance(step, FlashStep):
            step = prepare(meta, kv_cache).backend_data
        return varlen_paged_attention(q, kv_cache, meta, step, scale)
