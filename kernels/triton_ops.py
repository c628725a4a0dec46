"""Fused Triton versions of the model's elementwise ops, call-compatible with torch_ref:
RMSNorm (with the residual add fused in), neox rotary, SiLU-and-mul.

Each computes in float32 and rounds once to the input dtype, where torch_ref rounds
after every op in that dtype: results agree within an ulp or two of bfloat16/float16
and to float32 rounding in float32. Every function takes optional `out` buffers (the
tests poison them to check that every element is written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROW = 65536  # widest row one RMSNorm program holds in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_res, stride_out,
    stride_res_out, n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program r normalises row r (after adding its residual row, when given)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as torch's x + r
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)  # HF rounds before the weight multiply
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., H) as (N, H) with a contiguous last dim (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms_norm(x, residual, weight, eps, out, residual_out) -> None:
    hidden = x.shape[-1]
    if hidden > MAX_ROW:
        raise ValueError(f"rms_norm rows of {hidden} exceed {MAX_ROW}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match rows of {hidden}")
    x2, o2 = _rows(x), out.view(-1, hidden)
    r2 = x2 if residual is None else _rows(residual)
    ro2 = o2 if residual_out is None else residual_out.view(-1, hidden)
    if x2.shape[0] == 0:
        return
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, ro2, x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
        hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., H) -> x / rms(x) * weight (..., H), contiguous, x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    _launch_rms_norm(x, None, weight, eps, out, None)
    return out


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(rms_norm(x + residual), x + residual), both (..., H): one read of x and residual."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xt, stride_xh, stride_cos,
    stride_sin, stride_ot, stride_oh, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Program (t, j) rotates heads [j*BLOCK_H, (j+1)*BLOCK_H) of token t."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF_P)
    col_ok = cols < HALF
    mask = (heads < num_heads)[:, None] & col_ok[None, :]
    c = tl.load(cos_ptr + t * stride_cos + cols, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sin + cols, mask=col_ok, other=0.0).to(tl.float32)
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * c[None, :] - x2 * s[None, :]).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(dtype), mask=mask)


def rotate_neox(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Neox-style rotary (HF rotate_half): x (T, H, D), cos/sin (T, D/2) -> (T, H, D).

    x may be a strided view (e.g. the q|k columns of a fused qkv projection) as long as
    its last dim is contiguous; cos and sin may be column slices of one cache row."""
    num_tokens, num_heads, head_dim = x.shape
    half = head_dim // 2
    if head_dim % 2 or cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(
            f"rotary needs x (T, H, even D) and cos/sin (T, D/2); got {tuple(x.shape)}, "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if num_tokens == 0 or num_heads == 0:
        return out
    block_h = min(16, triton.next_power_of_2(num_heads))
    _rotary_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        x, cos, sin, out, num_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), HALF=half, HALF_P=triton.next_power_of_2(half),
        BLOCK_H=block_h,
    )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr
):  # fmt: skip
    """Program (r, j) computes columns [j*BLOCK, (j+1)*BLOCK) of row r."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., 2I) = [gate | up] -> silu(gate) * up, (..., I)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    if out is None:
        out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    x2, o2 = _rows(x), out.view(-1, inter)
    if x2.shape[0] == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, o2, x2.stride(0), o2.stride(0), inter, BLOCK=block
    )
    return out
