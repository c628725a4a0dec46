"""Rotary embedding and the KV-cache write in one Triton kernel.

A decode layer runs a dozen kernels; at batch 1 most are tiny, and each costs its
launch gap as much as its work. After the fused q|k|v projection, rotating q and k
(`triton_ops.rotate_neox`) and storing k and v in their cache slots
(`triton_attn.write_kv`) were two kernels that read the same rows; here they are
one: program (t, j) takes heads [j*BLOCK_H, (j+1)*BLOCK_H) of token t's q|k|v row,
rotates the q and k heads in float32 (rounded once, as rotate_neox does), and stores
q heads in the output, k and v heads in the cache (slots < 0, CUDA-graph pads, store
no K/V). The rotated k never exists outside the cache. Bit-identical to the two
kernels it replaces (tests/kernels/test_triton_rope_kv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton_attn import PagedCache


@triton.jit
def _rope_kv_kernel(
    x_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_xt, stride_xh, stride_cos, stride_sin, stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # of q | k | v
    cols = tl.arange(0, HALF_P)
    col_ok = cols < HALF
    is_q = heads < NUM_Q_HEADS
    is_v = heads >= NUM_Q_HEADS + NUM_KV_HEADS
    in_row = heads < NUM_Q_HEADS + 2 * NUM_KV_HEADS
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    mask = in_row[:, None] & col_ok[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_cos + cols, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sin + cols, mask=col_ok, other=0.0).to(tl.float32)
    rot = (~is_v)[:, None]  # v heads pass through
    y1 = tl.where(rot, x1 * c[None, :] - x2 * s[None, :], x1)
    y2 = tl.where(rot, x2 * c[None, :] + x1 * s[None, :], x2)

    q_mask = is_q[:, None] & col_ok[None, :]
    q_dst = q_ptr + t * stride_qt + heads[:, None] * stride_qh + cols[None, :]
    q_dtype = q_ptr.dtype.element_ty
    tl.store(q_dst, y1.to(q_dtype), mask=q_mask)
    tl.store(q_dst + HALF, y2.to(q_dtype), mask=q_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        base = block * stride_cb + (slot - block * BLOCK_SIZE) * stride_cs
        kv_head = tl.where(is_v, heads - NUM_Q_HEADS - NUM_KV_HEADS, heads - NUM_Q_HEADS)
        dst = base + kv_head[:, None] * stride_ch + cols[None, :]
        k_mask = (~is_q & ~is_v)[:, None] & col_ok[None, :]
        v_mask = (is_v & in_row)[:, None] & col_ok[None, :]
        c_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst, y1.to(c_dtype), mask=k_mask)
        tl.store(k_cache_ptr + dst + HALF, y2.to(c_dtype), mask=k_mask)
        tl.store(v_cache_ptr + dst, y1.to(c_dtype), mask=v_mask)
        tl.store(v_cache_ptr + dst + HALF, y2.to(c_dtype), mask=v_mask)


def rotate_and_write_kv(
    qkv: torch.Tensor,
    num_q_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: PagedCache,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """qkv (T, Hq + 2 Hkv, D), the q | k | v heads of each token (a view of the fused
    projection; last dim contiguous), cos/sin (T, D/2) -> rotated q (T, Hq, D); the
    rotated k and v go to their slots of `cache` (negative slots: none)."""
    num_tokens, num_heads, head_dim = qkv.shape
    num_kv_heads = cache.num_kv_heads
    if num_heads != num_q_heads + 2 * num_kv_heads or head_dim != cache.head_dim:
        raise ValueError(
            f"qkv must be (T, {num_q_heads} + 2 x {num_kv_heads}, {cache.head_dim}), "
            f"got {tuple(qkv.shape)}"
        )
    half = head_dim // 2
    if head_dim % 2 or cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(
            f"rotary needs cos/sin (T, D/2) = ({num_tokens}, {half}); got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if qkv.stride(-1) != 1:
        raise ValueError("qkv needs a contiguous last dim")
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    block_h = min(16, triton.next_power_of_2(num_heads))
    _rope_kv_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        qkv, cos, sin, q, cache.key, cache.value, slot_mapping,
        qkv.stride(0), qkv.stride(1), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        cache.stride_block, cache.stride_slot, cache.stride_head,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_SIZE=cache.block_size,
        HALF=half, HALF_P=triton.next_power_of_2(half), BLOCK_H=block_h,
    )  # fmt: skip
    return q
