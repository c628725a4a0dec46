"""Triton paged attention and KV write against the torch reference, in Triton's
interpreter on CPU (see triton_interpreter.py: these run only where TRITON_INTERPRET=1,
e.g. in test_triton_interpreter.py's child process).

Batches mix decodes, first prefill chunks, chunks over earlier context and k+1 verify
windows, with odd lengths, partially filled last blocks and block tables in random
order. The reference is torch_ref.paged_attention in float32 over the same (rounded)
inputs. Tolerances (max abs error): float32 1e-5; float16 2e-3 (about 2 ulp of outputs
below 2, as the kernel rounds P to float16 before P @ V); bfloat16 2e-2 (the same, and
the interpreter truncates where a GPU rounds to nearest). Output buffers are poisoned
with NaN first, so every element must be written.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import probe_interpreter, requires_interpreter

from tandem.engine.model_input import RunSeq, build_model_input
from tandem.kernels import torch_ref

pytestmark = requires_interpreter

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (start_pos, num_tokens) per sequence: 12 sequences, 80 tokens, contexts up to 103
MANY = [(0, 37), (9, 1), (40, 1), (13, 4), (0, 1), (31, 1), (70, 5), (16, 16), (5, 1),
        (100, 3), (2, 9), (63, 1)]  # fmt: skip
LONG = [(300, 1), (150, 4), (0, 1), (511, 1), (77, 2)]  # few queries, long contexts


@pytest.fixture(scope="module")
def ta():
    probe_interpreter()
    from tandem.kernels import triton_attn

    assert triton_attn.INTERPRETED
    return triton_attn


def make_batch(runs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """(meta, head-major cache, q): every cache slot random, so context K/V and this
    step's K/V are already in place; block tables are a random permutation."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(start + n) // block_size) + 1 for start, n in runs]  # one spare block each
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    seqs = [
        RunSeq(list(range(n)), start, [perm.pop() for _ in range(nb)], n)
        for (start, n), nb in zip(runs, need, strict=True)
    ]
    meta = build_model_input(seqs, block_size, "cpu").attn_meta
    shape = torch_ref.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=g).to(dtype)
    return meta, cache, q


def reference(q, cache, meta, scale):
    return torch_ref.paged_attention(q.float(), cache.float(), meta, scale)


def run_triton(ta, q, cache, meta, scale, num_splits=None, layout="head", plan=None):
    pages = ta.head_major(cache) if layout == "head" else ta.token_major(cache)
    out = torch.full_like(q, float("nan"))
    ret = ta.paged_attention(
        q, pages, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.max_query_len, meta.max_seq_len, scale, out=out, num_splits=num_splits, plan=plan,
    )  # fmt: skip
    assert ret is out
    assert not out.isnan().any(), "some output elements were never written"
    return out


CASES = [  # block_size, Hq, Hkv (GQA ratio 1/4/8), head_dim, dtype
    (16, 4, 4, 64, torch.float32),
    (32, 8, 2, 80, torch.float16),
    (16, 8, 1, 96, torch.bfloat16),
    (32, 4, 1, 128, torch.float16),
    (16, 2, 2, 256, torch.bfloat16),
    (16, 16, 2, 64, torch.bfloat16),
]


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype", CASES)
def test_mixed_batch_matches_torch(ta, block_size, num_heads, num_kv_heads, head_dim, dtype):
    meta, cache, q = make_batch(MANY, block_size, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = run_triton(ta, q, cache, meta, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(
        out.float(), reference(q, cache, meta, scale), atol=ATOL[dtype], rtol=0
    )


@pytest.mark.parametrize("num_splits", [None, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_matches_torch(ta, num_splits, dtype):
    """Long contexts, few queries: split ranges (more splits than some sequences have
    key tiles, so empty splits too) merge to the unsplit result."""
    meta, cache, q = make_batch(LONG, 16, 8, 2, 64, dtype, seed=1)
    out = run_triton(ta, q, cache, meta, 0.125, num_splits=num_splits)
    torch.testing.assert_close(
        out.float(), reference(q, cache, meta, 0.125), atol=ATOL[dtype], rtol=0
    )


@pytest.mark.parametrize(
    "change",
    [dict(tile_n=16), dict(tile_n=128, num_stages=1),
     dict(block_m=32, block_q=8, tile_n=64)],
)  # fmt: skip
def test_any_launch_plan_matches_torch(ta, change):
    """Plans other than the default (the GPU check's sweep times them): narrower and
    wider key tiles, fewer rows per program."""
    import dataclasses

    meta, cache, q = make_batch(MANY, 16, 16, 4, 64, torch.float16, seed=3)
    default = ta.plan_attention(
        meta.seq_lens.shape[0], meta.max_query_len, meta.max_seq_len, 4, 4, 64, 1
    )
    plan = dataclasses.replace(default, **change)
    out = run_triton(ta, q, cache, meta, 0.125, plan=plan)
    torch.testing.assert_close(
        out.float(), reference(q, cache, meta, 0.125), atol=ATOL[torch.float16], rtol=0
    )


def test_token_major_layout_gives_the_same_result(ta):
    """The flash-attn/NPU page layout (2, NB, BS, Hkv, D) through the same kernel."""
    meta, cache, q = make_batch(MANY[:6], 16, 8, 2, 64, torch.float16, seed=2)
    token_major = cache.transpose(2, 3).contiguous()
    out = run_triton(ta, q, token_major, meta, 0.125, layout="token")
    torch.testing.assert_close(out, run_triton(ta, q, cache, meta, 0.125), atol=0, rtol=0)


def test_plan_splits_only_short_runs_over_long_contexts(ta):
    plan = ta.plan_attention
    # batch-1 decode over 4k keys on a 132-SM card: split to fill the SMs, at most 16
    assert plan(1, 1, 4096, 8, 4, 128, 132).num_splits == 16
    assert plan(1, 1, 600, 8, 4, 128, 132).num_splits == 2  # >= 256 keys per split
    assert plan(256, 1, 4096, 8, 4, 128, 132).num_splits == 1  # enough programs already
    assert plan(1, 64, 4096, 8, 4, 128, 132).num_splits == 1  # prefill chunk: no split
    p = plan(4, 512, 512, 8, 4, 64, 132)  # prefill, head_dim 64: 128 rows, 64-key tiles
    assert (p.block_m, p.block_q, p.tile_n, p.num_warps) == (128, 32, 64, 8)
    p = plan(4, 512, 512, 8, 4, 128, 132)  # head_dim 128: 64 rows, 32-key tiles
    assert (p.block_m, p.block_q, p.tile_n, p.num_warps) == (64, 16, 32, 4)
    p = plan(4, 1, 512, 2, 8, 64, 132)  # decode, GQA 8: 16 rows = 2 tokens x 8 heads
    assert (p.block_m, p.block_q) == (16, 2)
    assert plan(4, 512, 512, 1, 4, 256, 132).block_m == 64  # head_dim 256: smaller tiles
    # decodes and verify windows stream keys in wide tiles, 2 stages deep
    assert (p.tile_n, p.num_stages) == (128, 2)
    p = plan(4, 5, 512, 8, 4, 128, 132)
    assert (p.block_m, p.tile_n, p.num_stages) == (32, 64, 2)
    # float32 keeps the first, unswept tiles (4-byte tiles would need up to 4x the
    # shared memory of the bf16 ones the sweep chose)
    p = plan(4, 5, 512, 8, 4, 128, 132, 4)
    assert (p.block_m, p.tile_n, p.num_stages) == (32, 32, 3)
    p = plan(4, 512, 512, 8, 4, 128, 132, 4)
    assert (p.block_m, p.block_q, p.tile_n, p.num_warps) == (128, 32, 64, 8)


def test_rejects_q_that_does_not_fit_the_cache(ta):
    meta, cache, q = make_batch([(0, 3)], 16, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        ta.paged_attention(q[:, :3], ta.head_major(cache), meta.query_start_loc, meta.seq_lens,
                           meta.block_tables, 3, 3, 0.125)  # fmt: skip


@pytest.mark.parametrize("layout", ["head", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_writes_exactly_the_slots(ta, layout, dtype):
    """Poisoned cache: mapped slots get k/v bit-exactly, pad slots (-1) and every
    other slot stay NaN. Strided k/v (views into a fused qkv) are accepted."""
    block_size, num_kv_heads, head_dim, num_blocks = 16, 2, 80, 6
    if layout == "head":
        cache = torch.full((2, num_blocks, num_kv_heads, block_size, head_dim), float("nan"))
    else:
        cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    cache = cache.to(dtype)
    qkv = torch.randn(7, 5 * num_kv_heads * head_dim).to(dtype)
    k = qkv[:, : 2 * head_dim].view(7, num_kv_heads, head_dim)
    v = qkv[:, 3 * head_dim : 5 * head_dim].view(7, num_kv_heads, head_dim)
    slots = torch.tensor([5, 95, -1, 16, 0, 31, -1])
    pages = ta.head_major(cache) if layout == "head" else ta.token_major(cache)
    ta.write_kv(k, v, pages, slots)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        block, off = divmod(s, block_size)
        written[block, off] = True
        got_k = cache[0, block, :, off] if layout == "head" else cache[0, block, off]
        got_v = cache[1, block, :, off] if layout == "head" else cache[1, block, off]
        assert torch.equal(got_k, k[i]) and torch.equal(got_v, v[i])
    per_slot = cache.isnan().all(-1)  # (2, NB, Hkv, BS) or (2, NB, BS, Hkv)
    untouched = per_slot.all(2) if layout == "head" else per_slot.all(3)
    assert torch.equal(untouched, ~written.expand(2, -1, -1))
