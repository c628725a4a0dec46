"""Triton paged attention over one flattened varlen batch, and the KV-cache write.

One kernel serves prefill chunks (earlier context plus causal within the chunk),
single-token decodes and k+1 verify windows alike: a program owns BLOCK_Q query tokens
of one sequence times the GROUP query heads that share one KV head (BLOCK_M rows, so
GQA/MQA read each K/V tile once for the whole group), and walks that sequence's keys in
tiles of TILE_N with an online softmax in float32. Keys are found per key through the
block table, so a tile may span several pages and any block size works.

Which sequence a program serves is found in-kernel by binary search over
query_start_loc (sequence s owns q-tiles [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q +
s + 1)), so the grid, (T // BLOCK_Q + S, Hkv, splits), depends only on host ints: no
device-to-host sync, and CUDA graphs can capture it.

Split-K (flash decoding): when few query tokens meet long contexts, each program takes
one of NUM_SPLITS contiguous ranges of key tiles and writes an unnormalised partial
(acc, running max, running sum); a second kernel merges the partials per (token, head).

Layouts: kernels take K and V pages with (block, slot, head) strides and a contiguous
last dim, so the torch backend's head-major (2, NB, Hkv, BS, D) cache and flash-attn's
token-major (2, NB, BS, Hkv, D) cache are both served (see head_major / token_major).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels import torch_ref
from tandem.kernels.types import AttnMetadata

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SPLITS = 16  # key ranges per (q-tile, KV head) in the split-K path
MAX_SPLIT_QUERY_LEN = 8  # split-K only for runs this short (decodes, verify windows)
MIN_KEYS_PER_SPLIT = 256  # fewer keys per split than this is not worth a partial
LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class PagedCache:
    """One layer's K and V pages as the kernels see them (last dim contiguous)."""

    key: torch.Tensor  # K pages; element (block b, slot s, head h, d) at b*sb + s*ss + h*sh + d
    value: torch.Tensor  # V pages, same strides as key
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    stride_block: int  # sb
    stride_slot: int  # ss
    stride_head: int  # sh


def head_major(kv_cache: torch.Tensor) -> PagedCache:
    """The torch/Triton layout (2, NB, Hkv, BS, D)."""
    _, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    k = kv_cache[0]
    return PagedCache(k, kv_cache[1], block_size, num_kv_heads, head_dim, *_strides(k, 0, 2, 1))


def token_major(kv_cache: torch.Tensor) -> PagedCache:
    """The flash-attn / NPU layout (2, NB, BS, Hkv, D)."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    k = kv_cache[0]
    return PagedCache(k, kv_cache[1], block_size, num_kv_heads, head_dim, *_strides(k, 0, 1, 2))


def _strides(pages: torch.Tensor, block_dim: int, slot_dim: int, head_dim: int):
    if pages.stride(-1) != 1:
        raise ValueError(f"KV cache pages need a contiguous last dim, strides {pages.stride()}")
    return pages.stride(block_dim), pages.stride(slot_dim), pages.stride(head_dim)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_P: tl.constexpr, DIM_P: tl.constexpr,
):  # fmt: skip
    """Program t stores token t's K and V (all heads) at its slot; slots < 0 are pads."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS_P)
        dims = tl.arange(0, DIM_P)
        mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
        block = slot // BLOCK_SIZE
        dst = block * stride_cb + (slot - block * BLOCK_SIZE) * stride_cs
        dst = dst + heads[:, None] * stride_ch + dims[None, :]
        k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedCache, slot_mapping: torch.Tensor):
    """Store k, v (T, Hkv, D) at slot_mapping (T,) int (block * block_size + offset);
    tokens whose slot is negative (CUDA-graph padding) are skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("write_kv needs k and v with a contiguous last dim")
    _write_kv_kernel[(num_tokens,)](
        k, v, cache.key, cache.value, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride_block, cache.stride_slot, cache.stride_head,
        NUM_KV_HEADS=cache.num_kv_heads, HEAD_DIM=cache.head_dim, BLOCK_SIZE=cache.block_size,
        HEADS_P=triton.next_power_of_2(cache.num_kv_heads),
        DIM_P=triton.next_power_of_2(cache.head_dim),
    )  # fmt: skip


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first q-tile, qsl[s] // BLOCK_Q + s, is <= tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, k_cache_ptr, v_cache_ptr, table, head_off, t, kv_end, q_pos, dims, dim_ok,
    m_i, l_i, acc, qk_scale, stride_cb, stride_cs,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile t folded into the online softmax (m_i, l_i, acc). MASKED: apply the
    causal and length mask (tiles that some row sees only in part)."""
    keys = t * TILE_N + tl.arange(0, TILE_N)
    key_ok = keys < kv_end
    blocks = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    offs = blocks * stride_cb + (keys % BLOCK_SIZE) * stride_cs + head_off
    k = tl.load(
        k_cache_ptr + offs[None, :] + dims[:, None],
        mask=key_ok[None, :] & dim_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where((keys[None, :] <= q_pos[:, None]) & key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_cache_ptr + offs[:, None] + dims[None, :],
        mask=key_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attn_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, num_seqs, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first run token of this tile
    if q_first < q_len:
        context = tl.load(seq_lens_ptr + seq) - q_len  # keys before the run
        rows = tl.arange(0, BLOCK_M)
        tok = q_first + rows // GROUP  # run token of each row
        head = kv_head * GROUP + rows % GROUP  # query head of each row
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        dims = tl.arange(0, HEAD_DIM_P)
        dim_ok = dims < HEAD_DIM
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = context + tok  # each row sees keys 0..q_pos
        kv_end = context + tl.minimum(q_first + BLOCK_Q, q_len)  # keys any row sees
        num_tiles = tl.cdiv(kv_end, TILE_N)
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        t_lo = split * per_split
        t_hi = tl.minimum(t_lo + per_split, num_tiles)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_off = kv_head.to(tl.int64) * stride_ch
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        # tiles every row sees whole (all keys <= the first row's position) need no mask
        t_full = (context + q_first + 1) // TILE_N
        for t in range(t_lo, tl.minimum(t_hi, t_full)):
            m_i, l_i, acc = _attend_tile(
                q, k_cache_ptr, v_cache_ptr, table, head_off, t, kv_end, q_pos, dims, dim_ok,
                m_i, l_i, acc, qk_scale, stride_cb, stride_cs,
                BLOCK_SIZE, TILE_N, DOT_PRECISION, UPCAST, False,
            )  # fmt: skip
        for t in range(tl.maximum(t_lo, t_full), t_hi):
            m_i, l_i, acc = _attend_tile(
                q, k_cache_ptr, v_cache_ptr, table, head_off, t, kv_end, q_pos, dims, dim_ok,
                m_i, l_i, acc, qk_scale, stride_cb, stride_cs,
                BLOCK_SIZE, TILE_N, DOT_PRECISION, UPCAST, True,
            )  # fmt: skip
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            dst = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        else:
            part = (q_rows * num_heads + head) * NUM_SPLITS + split
            tl.store(part_max_ptr + part, m_i, mask=row_ok)
            tl.store(part_sum_ptr + part, l_i, mask=row_ok)
            dst = part_acc_ptr + part[:, None] * HEAD_DIM_P + dims[None, :]
            tl.store(dst, acc, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,
):  # fmt: skip
    """Program (t, h) merges the NUM_SPLITS partials of token t, query head h."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    base = (t * num_heads + h) * NUM_SPLITS
    splits = tl.arange(0, SPLITS_P)
    split_ok = splits < NUM_SPLITS
    m = tl.load(part_max_ptr + base + splits, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + base + splits, mask=split_ok, other=0.0)  # noqa: E741
    w = tl.exp2(m - tl.max(m, 0))  # split 0 always holds key 0, so the max is finite
    dims = tl.arange(0, HEAD_DIM_P)
    acc = tl.load(
        part_acc_ptr + (base + splits)[:, None] * HEAD_DIM_P + dims[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    dst = out_ptr + t * stride_ot + h * stride_oh + dims
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# True when this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 at
# import), the only way they run on a CPU. The interpreter's tl.dot multiplies bf16's raw
# uint16 storage (triton 3.9), so there bf16 dot operands are upcast to float32 (UPCAST).
INTERPRETED = not isinstance(_paged_attn_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True, slots=True)
class AttnPlan:
    """Tile sizes of one attention launch; a function of host ints only."""

    block_m: int  # rows per program: BLOCK_Q tokens x GROUP heads, padded to a power of 2
    block_q: int  # query tokens per program
    tile_n: int  # keys per inner iteration
    num_splits: int  # split-K ranges (1 = no split)
    num_warps: int
    num_stages: int = 3  # software-pipelining depth of the key loop


@functools.lru_cache(maxsize=4096)
def plan_attention(
    num_seqs: int, max_query_len: int, max_seq_len: int, num_kv_heads: int, group: int,
    head_dim: int, num_sms: int, elem_bytes: int = 2,
) -> AttnPlan:  # fmt: skip
    """Tiles for a step; split-K when short runs over long contexts leave SMs idle
    (fewer than 2 programs per SM without it).

    Tile sizes, warps and pipelining depth were chosen by the GPU check's sweep on an
    H200 in bf16 (graph-replayed, benchmarks/RESULTS.md) for decodes, verify windows
    and runs of 64 rows or more; head_dim 256, float32 (4-byte tiles would need up to
    4x the shared memory) and runs of fewer rows keep the first, unswept choice."""
    dim_p = triton.next_power_of_2(head_dim)
    short = max_query_len <= MAX_SPLIT_QUERY_LEN  # decodes and verify windows
    swept = elem_bytes <= 2 and dim_p <= 128
    cap = 128 if dim_p <= 64 or (not swept and dim_p <= 128) else 64
    block_m = max(16, triton.next_power_of_2(group))
    block_m = min(max(block_m, triton.next_power_of_2(max_query_len * group)), max(cap, block_m))
    block_q = max(1, block_m // group)
    if swept and short:
        # few rows per program: stream keys in wide tiles, more bytes in flight (26-29%
        # faster than 32-key tiles at 3 stages at d64, 12-14% at d128; one loss: 18%
        # slower at batch 1 over short contexts split 16 ways, as graphs plan)
        tile_n, num_warps, num_stages = (128 if dim_p <= 64 else 64), 4, 2
    elif swept and block_m >= 64 and dim_p <= 64:
        tile_n, num_warps, num_stages = 64, 8 if block_m >= 128 else 4, 3
    elif swept and block_m >= 64:
        tile_n, num_warps, num_stages = 32, 4, 2
    else:
        tile_n = 64 if block_m >= 64 and dim_p <= 128 else 32
        num_warps = 8 if block_m * dim_p >= 128 * 128 else 4
        num_stages = 3
    num_splits = 1
    if max_query_len <= MAX_SPLIT_QUERY_LEN:
        programs = num_seqs * -(-max_query_len // block_q) * num_kv_heads
        by_occupancy = -(-2 * num_sms // programs)
        by_length = max_seq_len // MIN_KEYS_PER_SPLIT
        num_splits = max(1, min(by_occupancy, by_length, MAX_SPLITS))
    return AttnPlan(block_m, block_q, tile_n, num_splits, num_warps, num_stages)


def paged_attention(
    q: torch.Tensor, cache: PagedCache, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, max_query_len: int, max_seq_len: int, scale: float,
    out: torch.Tensor | None = None, num_splits: int | None = None, plan: AttnPlan | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of q (T, Hq, D) over paged K/V -> out (T, Hq, D), q's dtype.

    query_start_loc (S+1,) int32, seq_lens (S,) int32 (context after the step, the
    step's K/V already written), block_tables (S, max_blocks) int32. Query token i of a
    run of n ending at seq_len L attends to keys 0..L-n+i. num_splits: force the split-K
    range count (None = plan_attention's choice); plan: the whole launch plan instead
    of plan_attention's (for tuning).
    """
    num_tokens, num_heads, head_dim = q.shape
    if num_heads % cache.num_kv_heads or head_dim != cache.head_dim or q.stride(-1) != 1:
        raise ValueError(
            f"q {tuple(q.shape)} (strides {q.stride()}) does not fit the cache's "
            f"{cache.num_kv_heads} KV heads of dim {cache.head_dim}"
        )
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    num_seqs, group = seq_lens.shape[0], num_heads // cache.num_kv_heads
    if plan is None:
        plan = plan_attention(
            num_seqs, max_query_len, max_seq_len, cache.num_kv_heads, group, head_dim,
            num_sms(q.device), q.element_size(),
        )  # fmt: skip
    splits = plan.num_splits if num_splits is None else num_splits
    dim_p = triton.next_power_of_2(head_dim)
    parts = _split_buffers(num_tokens * num_heads * splits, dim_p, q.device, splits > 1)
    grid = (num_tokens // plan.block_q + num_seqs, cache.num_kv_heads, splits)
    _paged_attn_kernel[grid](
        out, q, cache.key, cache.value, block_tables, seq_lens, query_start_loc, *parts,
        scale * LOG2E, num_seqs, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        cache.stride_block, cache.stride_slot, cache.stride_head, block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=cache.block_size, HEAD_DIM=head_dim, HEAD_DIM_P=dim_p,
        BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, TILE_N=plan.tile_n, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, *parts, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P=dim_p, NUM_SPLITS=splits,
            SPLITS_P=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out


def _split_buffers(rows: int, dim_p: int, device: torch.device, needed: bool):
    """float32 partial (acc (rows, dim_p), max (rows,), sum (rows,)); 1-element dummies
    when there is no split (the kernel never touches them then)."""
    n = rows if needed else 1
    acc = torch.empty(n * dim_p, dtype=torch.float32, device=device)
    return acc, torch.empty(n, dtype=torch.float32, device=device), torch.empty_like(acc[:n])


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (torch caches the properties); 1 on CPU,
    where the kernels only run in Triton's interpreter."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


class TritonAttentionBackend:
    """Triton kernels over the head-major cache shared with the torch backend; CUDA
    (or CPU under Triton's interpreter, for tests). Capturable in CUDA graphs."""

    name = "triton"
    ops_module = "tandem.kernels.triton_ops"
    supports_cuda_graphs = True
    uses_buckets = False

    @classmethod
    def unavailable_reasons(
        cls, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
    ) -> list[str]:
        reasons = []
        if device.type != "cuda" and not (device.type == "cpu" and INTERPRETED):
            reasons.append(f"needs a CUDA device (or TRITON_INTERPRET=1 on cpu), got {device}")
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not one of {SUPPORTED_DTYPES}")
        if not 16 <= head_dim <= MAX_HEAD_DIM or head_dim % 8:
            reasons.append(f"head_dim must be a multiple of 8 in [16, 256], got {head_dim}")
        if block_size <= 0:
            reasons.append(f"block_size must be positive, got {block_size}")
        return reasons

    kv_cache_shape = staticmethod(torch_ref.kv_cache_shape)

    @staticmethod
    def prepare(meta: AttnMetadata, kv_cache: torch.Tensor) -> AttnMetadata:
        return meta  # the kernels need nothing beyond the flat fields

    @staticmethod
    def write_kv(k, v, kv_cache: torch.Tensor, meta: AttnMetadata) -> None:
        write_kv(k, v, head_major(kv_cache), meta.slot_mapping)

    @staticmethod
    def rotate_and_write_kv(qkv, num_q_heads, cos, sin, kv_cache, meta) -> torch.Tensor:
        from tandem.kernels.triton_rope_kv import rotate_and_write_kv

        cache = head_major(kv_cache)
        return rotate_and_write_kv(qkv, num_q_heads, cos, sin, cache, meta.slot_mapping)

    @staticmethod
    def paged_attention(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float
    ) -> torch.Tensor:
        return paged_attention(
            q, head_major(kv_cache), meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.max_query_len, meta.max_seq_len, scale,
        )  # fmt: skip
