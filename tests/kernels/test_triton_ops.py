"""Fused Triton RMSNorm (+ residual), rotary and SiLU-and-mul against torch_ref, in
Triton's interpreter on CPU (only where TRITON_INTERPRET=1; see triton_interpreter.py).

Tolerances (abs and rel): float32 1e-5; float16 2e-3 and bfloat16 2e-2, about two ulp:
the kernels round once from float32 where torch_ref rounds after each op, and the
interpreter truncates to bfloat16 where a GPU rounds to nearest. Outputs are poisoned
with NaN first, so every element must be written.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import probe_interpreter, requires_interpreter

from tandem.kernels import torch_ref

pytestmark = requires_interpreter
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


@pytest.fixture(scope="module")
def to():
    probe_interpreter()
    from tandem.kernels import triton_ops

    return triton_ops


def close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 100])  # a power-of-2 padded row, and not
def test_rms_norm(to, dtype, hidden):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 5, hidden, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    out = to.rms_norm(x, w, 1e-5, out=poisoned(x.shape, dtype))
    close(out, torch_ref.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_residual(to, dtype):
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(7, 64, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    out, new_res = to.rms_norm_residual(
        x, res, w, 1e-6, out=poisoned(x.shape, dtype), residual_out=poisoned(x.shape, dtype)
    )
    ref_out, ref_res = torch_ref.rms_norm_residual(x, res, w, 1e-6)
    close(new_res, ref_res, dtype)
    close(out, ref_out, dtype)


def test_rms_norm_of_strided_heads(to):
    """Qwen3's per-head q norm: a (T, H, D) view into the fused qkv projection."""
    qkv = torch.randn(5, 6 * 32)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    w = torch.randn(32)
    close(to.rms_norm(q, w, 1e-6), torch_ref.rms_norm(q, w, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rotary_on_qkv_view(to, dtype, head_dim):
    """x is the q|k columns of a fused qkv row (row stride > H*D); cos and sin are the
    two halves of one cache row each, as RotaryEmbedding.cos_sin hands them over."""
    g = torch.Generator().manual_seed(2)
    num_tokens, hq, hkv = 9, 4, 2  # 6 rotated heads: not a multiple of the head block
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * head_dim, generator=g).to(dtype)
    x = qkv[:, : (hq + hkv) * head_dim].view(num_tokens, hq + hkv, head_dim)
    cache = torch.randn(num_tokens, head_dim, generator=g).to(dtype)
    cos, sin = cache.chunk(2, dim=-1)
    out = to.rotate_neox(x, cos, sin, out=poisoned(x.shape, dtype))
    close(out, torch_ref.rotate_neox(x, cos, sin), dtype)


def test_rotary_rejects_mismatched_cos(to):
    with pytest.raises(ValueError, match="cos/sin"):
        to.rotate_neox(torch.randn(3, 2, 16), torch.randn(3, 4), torch.randn(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(to, dtype):
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(3, 4, 2 * 1100, generator=g)).to(dtype)  # 2 column blocks, ragged
    out = to.silu_and_mul(x, out=poisoned((3, 4, 1100), dtype))
    close(out, torch_ref.silu_and_mul(x), dtype)


def test_empty_inputs(to):
    assert to.silu_and_mul(torch.randn(0, 8)).shape == (0, 4)
    assert to.rms_norm(torch.randn(0, 8), torch.ones(8), 1e-6).shape == (0, 8)
    assert to.rotate_neox(torch.randn(0, 2, 8), torch.randn(0, 4), torch.randn(0, 4)).shape == (
        0,
        2,
        8,
    )
