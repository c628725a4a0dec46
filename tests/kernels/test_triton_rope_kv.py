"""The fused rotary + KV-cache write (kernels/triton_rope_kv.py) against the two Triton
kernels it replaces, rotate_neox then write_kv: bit-identical q and caches, in Triton's
interpreter on CPU (see triton_interpreter.py). q is poisoned with NaN first, so every
element must be written; the caches start from a sentinel, so every slot but the
step's must be left alone (pad slots, -1, included)."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import probe_interpreter, requires_interpreter

pytestmark = requires_interpreter
SENTINEL = 7.0


@pytest.fixture(scope="module")
def kernels():
    probe_interpreter()
    from tandem.kernels import triton_attn, triton_ops, triton_rope_kv

    return triton_attn, triton_ops, triton_rope_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 80), (7, 1, 128), (32, 8, 64)])
@pytest.mark.parametrize("layout", ["head_major", "token_major"])
def test_fused_rotary_and_kv_write_equal_the_two_kernels(kernels, dtype, heads, layout):
    triton_attn, triton_ops, triton_rope_kv = kernels
    hq, hkv, d = heads
    t, block_size, num_blocks = 6, 4, 5
    g = torch.Generator().manual_seed(hq * 100 + d)
    width = (hq + 2 * hkv) * d
    proj = torch.randn(t, width + 8, generator=g).to(dtype)  # a padded row: strided view
    qkv = proj[:, :width].view(t, hq + 2 * hkv, d)
    angle = torch.rand(t, d // 2, generator=g) * 6.28
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slots = torch.tensor([9, 0, -1, 19, 4, -1], dtype=torch.int64)
    shape = (2, num_blocks, hkv, block_size, d)
    if layout == "token_major":
        shape = (2, num_blocks, block_size, hkv, d)
    view = getattr(triton_attn, layout)
    ref_cache = torch.full(shape, SENTINEL, dtype=dtype)
    cache = ref_cache.clone()

    qk = triton_ops.rotate_neox(qkv[:, : hq + hkv], cos, sin)
    triton_attn.write_kv(qk[:, hq:], qkv[:, hq + hkv :], view(ref_cache), slots)
    q = triton_rope_kv.rotate_and_write_kv(qkv, hq, cos, sin, view(cache), slots)

    assert q.shape == (t, hq, d) and not q.isnan().any()
    assert torch.equal(q, qk[:, :hq])
    assert torch.equal(cache, ref_cache)
    assert (cache != SENTINEL).any()


def test_bad_shapes_are_refused(kernels):
    triton_attn, _, triton_rope_kv = kernels
    cache = triton_attn.head_major(torch.zeros(2, 3, 2, 4, 16))
    cos = sin = torch.ones(3, 8)
    slots = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="qkv must be"):
        triton_rope_kv.rotate_and_write_kv(torch.zeros(3, 7, 16), 4, cos, sin, cache, slots)
    with pytest.raises(ValueError, match="cos/sin"):
        triton_rope_kv.rotate_and_write_kv(
            torch.zeros(3, 8, 16), 4, torch.ones(3, 4), sin, cache, slots
        )
