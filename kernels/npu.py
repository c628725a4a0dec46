"""The Ascend NPU backend: torch_npu's fused inference attention over paged KV.

`torch_npu.npu_fused_infer_attention_score` (FIA) takes the whole flattened step in the
"TND" layout: q (T, Hq, D), cumulative query ends per sequence, each sequence's KV
length, a block table, and pages laid out (num_blocks, Hkv, block_size, D) per K and V,
which CANN documents as its faster paged format and which is the torch backend's
head-major cache, so writes reuse torch_ref.write_kv (index_copy_ runs on NPU).
sparse_mode 3 is the bottom-right-aligned causal mask (token i of a run of n at the end
of L keys sees keys 0..L-n+i), given as the 2048 x 2048 compressed upper-triangular
mask FIA expects. Lengths cross as host lists: one device-to-host copy per step, in
prepare. Block sizes must be multiples of 16 (128 is CANN's recommendation).

torch_npu is imported only inside the op call, so selection and the shape contract are
testable without it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

import torch

from tandem.kernels import torch_ref
from tandem.kernels.types import AttnMetadata

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MASK_SIZE = 2048  # FIA's compressed causal mask for sparse_mode 2/3/4
BLOCK_MULTIPLE = 16  # FIA paged KV: fp16/bf16 blocks must be 16-aligned
MAX_HEAD_DIM = 512


def module_installed(name: str) -> bool:
    """True when `name` can be imported (found on the path; not imported here)."""
    return importlib.util.find_spec(name) is not None


@dataclass(slots=True)
class NpuStep:
    """Per-step inputs FIA takes beyond AttnMetadata."""

    query_ends: list[int]  # (S,) cumulative query lengths, query_start_loc[1:]
    kv_lens: list[int]  # (S,) context length of each sequence after the step
    causal_mask: torch.Tensor  # (2048, 2048) bool, True above the diagonal (masked)


def prepare(meta: AttnMetadata, kv_cache: torch.Tensor) -> AttnMetadata:
    """meta with the torch backend's write rows and FIA's host-side lengths and mask."""
    mask = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=kv_cache.device).triu_(1)
    num_seqs = meta.seq_lens.shape[0]
    lengths = torch.cat((meta.query_start_loc[1:], meta.seq_lens)).tolist()  # one sync
    step = NpuStep(query_ends=lengths[:num_seqs], kv_lens=lengths[num_seqs:], causal_mask=mask)
    rows = torch_ref.kv_write_rows(meta.slot_mapping, kv_cache)
    return replace(meta, kv_write_rows=rows, backend_data=step)


def fused_infer_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, step: NpuStep, scale: float
) -> torch.Tensor:
    """The one torch_npu call: q (T, Hq, D) over pages (NB, Hkv, BS, D) -> (T, Hq, D)."""
    import torch_npu

    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    out, _ = torch_npu.npu_fused_infer_attention_score(
        q,
        kv_cache[0],
        kv_cache[1],
        atten_mask=step.causal_mask,
        block_table=meta.block_tables,
        actual_seq_lengths=step.query_ends,
        actual_seq_lengths_kv=step.kv_lens,
        num_heads=q.shape[1],
        num_key_value_heads=num_kv_heads,
        scale=scale,
        input_layout="TND",
        block_size=block_size,
        sparse_mode=3,
    )
    return out


class NpuAttentionBackend:
    """torch_npu fused inference attention; NPU, fp16/bf16, head-major pages."""

    name = "npu"
    ops_module = "tandem.kernels.torch_ref"
    supports_cuda_graphs = False
    uses_buckets = False
    rotate_and_write_kv = None  # rotary and write_kv run one after the other

    @classmethod
    def unavailable_reasons(
        cls, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
    ) -> list[str]:
        reasons = []
        if device.type != "npu":
            reasons.append(f"needs an NPU device, got {device}")
        if not module_installed("torch_npu"):
            reasons.append("torch_npu is not installed")
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not one of {SUPPORTED_DTYPES}")
        if head_dim % 8 or not 0 < head_dim <= MAX_HEAD_DIM:
            reasons.append(f"head_dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {head_dim}")
        if block_size % BLOCK_MULTIPLE:
            reasons.append(
                f"paged KV needs block_size a multiple of {BLOCK_MULTIPLE}, got {block_size}"
            )
        return reasons

    kv_cache_shape = staticmethod(torch_ref.kv_cache_shape)
    prepare = staticmethod(prepare)

    @staticmethod
    def write_kv(k, v, kv_cache: torch.Tensor, meta: AttnMetadata) -> None:
        torch_ref.write_kv(k, v, kv_cache, meta.slot_mapping, meta.kv_write_rows)

    @staticmethod
    def paged_attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float
    ) -> torch.Tensor:
        step = meta.backend_data
        if not isinstance(step, NpuStep):
            meta = prepare(meta, kv_cache)
            step = meta.backend_data
        return fused_infer_attention(q.contiguous(), kv_cache, meta, step, scale)
