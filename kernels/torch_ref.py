"""Reference ops in plain torch: the oracle other backends are tested against, and the
path CPU users run (so it is written for speed too: no Python loop over sequences).

KV cache layout, one tensor per layer: (2, num_blocks, Hkv, block_size, D), [0] keys and
[1] values, head-major inside a block. Slot s = block_id * block_size + offset. Viewed as
(2, num_blocks * Hkv, block_size * D), one index_select gathers K and V of a batch
straight into (2, S, Hkv, L, D) order, contiguous per head: measured on CPU, torch SDPA
over that is 3.5x faster in bfloat16 (and as fast in float32) than over a token-major
(2, S, L, Hkv, D) gather.

Attention per layer: one gather per bucket (see AttnBucket) and one SDPA call per bucket
with a precomputed boolean mask. Decodes fold the GQA group into the query axis
((Sd, Hkv, G, D) queries, no KV repeat); longer runs use SDPA's enable_gqa. Two buckets
because padding single-token decodes up to a long prefill chunk would waste gather
bandwidth and FLOPs. Masked keys are still read: cache slots must hold finite values
(caches are allocated zeroed).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tandem.kernels.types import AttnBucket, AttnMetadata

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    """(2, num_blocks, Hkv, block_size, D): [0] keys, [1] values."""
    return (2, num_blocks, num_kv_heads, block_size, head_dim)


def kv_write_rows(slot_mapping: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """(T*Hkv,) rows of the (2, NB*Hkv*BS, D) cache view for slot_mapping (T,), token-major."""
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    heads = torch.arange(num_kv_heads, device=slot_mapping.device)
    return ((block[:, None] * num_kv_heads + heads) * block_size + offset[:, None]).reshape(-1)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    """Store k, v (T, Hkv, D) at slots slot_mapping (T,) int64 of one layer's cache.

    rows: kv_write_rows(slot_mapping, kv_cache), when precomputed for the step."""
    head_dim = kv_cache.shape[-1]
    rows = kv_write_rows(slot_mapping, kv_cache) if rows is None else rows
    flat = kv_cache.view(2, -1, head_dim)
    flat[0].index_copy_(0, rows, k.reshape(-1, head_dim))
    flat[1].index_copy_(0, rows, v.reshape(-1, head_dim))


def gather_rows(bucket: AttnBucket, kv_cache: torch.Tensor) -> torch.Tensor:
    """(Sb*Hkv*MB,) rows of the (2, NB*Hkv, BS*D) cache view, ordered (seq, head, block)."""
    num_kv_heads = kv_cache.shape[2]
    blocks = bucket.block_indices.view(bucket.num_seqs, 1, -1)
    heads = torch.arange(num_kv_heads, device=blocks.device).view(1, -1, 1)
    return (blocks * num_kv_heads + heads).reshape(-1)


def gather_kv(
    kv_cache: torch.Tensor, bucket: AttnBucket, workspace: torch.Tensor | None = None
) -> torch.Tensor:
    """The bucket's keys/values as (2, Sb, Hkv, Lb, D), contiguous, padded with block 0.

    workspace: flat scratch of the cache's dtype, used when large enough so that every
    layer reuses one buffer instead of allocating (and page-faulting) a new one.
    """
    _, num_blocks, num_kv_heads, block_size, head_dim = kv_cache.shape
    src = kv_cache.view(2, num_blocks * num_kv_heads, block_size * head_dim)
    rows = bucket.kv_rows if bucket.kv_rows is not None else gather_rows(bucket, kv_cache)
    numel = 2 * rows.numel() * src.shape[-1]
    if workspace is not None and workspace.numel() >= numel and workspace.dtype == src.dtype:
        out = workspace[:numel].view(2, rows.numel(), src.shape[-1])
        torch.index_select(src, 1, rows, out=out)
    else:
        out = src.index_select(1, rows)
    return out.view(2, bucket.num_seqs, num_kv_heads, bucket.kv_len, head_dim)


def prepare(meta: AttnMetadata, kv_cache: torch.Tensor) -> AttnMetadata:
    """meta with this layout's write/gather rows and a scratch buffer for the largest
    gather; computed once per step for all layers (whose caches share one shape)."""
    buckets = {}
    numel = 0
    for name in ("decode", "runs"):
        b = getattr(meta, name)
        if b is not None:
            b = replace(b, kv_rows=gather_rows(b, kv_cache))
            numel = max(numel, 2 * b.kv_rows.numel() * kv_cache.shape[3] * kv_cache.shape[4])
        buckets[name] = b
    return replace(
        meta,
        kv_write_rows=kv_write_rows(meta.slot_mapping, kv_cache),
        workspace=kv_cache.new_empty(numel),
        **buckets,
    )


def _attend_decodes(q: torch.Tensor, kv: torch.Tensor, b: AttnBucket, scale: float):
    """q (Sd, Hq, D), kv (2, Sd, Hkv, Lb, D) -> (Sd, Hq, D). The GQA group is the query axis."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv.shape[2]
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=b.mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _attend_runs(q: torch.Tensor, kv: torch.Tensor, b: AttnBucket, scale: float):
    """q (Sb*Qb, Hq, D) padded runs, kv (2, Sb, Hkv, Lb, D) -> (Sb*Qb, Hq, D)."""
    _, num_heads, head_dim = q.shape
    qp = q.view(b.num_seqs, b.query_len, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp, kv[0], kv[1], attn_mask=b.mask, scale=scale, enable_gqa=num_heads != kv.shape[2]
    )  # (Sb, Hq, Qb, D)
    return out.transpose(1, 2).reshape(-1, num_heads, head_dim)


def _attend_bucket(q, kv_cache, b: AttnBucket, scale: float, workspace) -> torch.Tensor:
    """Attention for one bucket: (Tb, Hq, D) in the bucket's token order."""
    index = b.query_indices if b.query_indices is not None else b.token_indices
    qb = q if index is None else q.index_select(0, index)
    kv = gather_kv(kv_cache, b, workspace)
    if b.query_len == 1:
        return _attend_decodes(qb, kv, b, scale)
    out = _attend_runs(qb, kv, b, scale)
    return out if b.output_indices is None else out.index_select(0, b.output_indices)


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of q (T, Hq, D) over each sequence's paged KV -> (T, Hq, D).

    Query token i of a run starting at position p attends to its sequence's keys at
    positions 0..p+i (earlier context and the run itself; the step's K/V must already
    be written). Hq must be a multiple of Hkv (GQA/MQA). Uses meta's prepared rows and
    workspace when set (see prepare), else computes them.
    """
    buckets = [b for b in (meta.decode, meta.runs) if b is not None]
    if len(buckets) == 1 and buckets[0].token_indices is None:
        return _attend_bucket(q, kv_cache, buckets[0], scale, meta.workspace)
    out = torch.empty_like(q)
    for b in buckets:  # at most two: decodes, longer runs
        attended = _attend_bucket(q, kv_cache, b, scale, meta.workspace)
        out.index_copy_(0, b.token_indices, attended)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., H) -> x / rms(x) * weight, computed in float32 as HF Llama does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm of a decoder layer."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary (HF rotate_half): x (T, H, D), cos/sin (T, D/2) -> (T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, Hq, D) and k (T, Hkv, D) at positions (T,).

    cos_sin_cache: (max_pos, D) rows [cos(pos * inv_freq) | sin(pos * inv_freq)], each
    half D/2 wide, in q's dtype.
    """
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2I) = [gate | up] -> silu(gate) * up, (..., I)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class TorchAttentionBackend:
    """The reference backend: torch SDPA over gathered blocks. Runs wherever torch does."""

    name = "torch"
    ops_module = __name__
    supports_cuda_graphs = False  # bucket shapes and masks change with every step
    uses_buckets = True
    rotate_and_write_kv = None  # rotary and write_kv run one after the other

    @classmethod
    def unavailable_reasons(
        cls, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
    ) -> list[str]:
        reasons = []
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not one of {SUPPORTED_DTYPES}")
        if head_dim <= 0 or head_dim % 2:
            reasons.append(f"head_dim must be even and positive, got {head_dim}")
        return reasons

    kv_cache_shape = staticmethod(kv_cache_shape)
    prepare = staticmethod(prepare)
    paged_attention = staticmethod(paged_attention)

    @staticmethod
    def write_kv(k, v, kv_cache: torch.Tensor, meta: AttnMetadata) -> None:
        write_kv(k, v, kv_cache, meta.slot_mapping, meta.kv_write_rows)
